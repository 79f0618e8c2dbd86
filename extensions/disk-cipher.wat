;; disk-cipher: encryption at rest, as a tenant's module shows it (docs/extensions.md, "Example
;; modules"). Every write's data is XORed with a keystream before it reaches the image, every
;; read's after it reaches the guest: the image holds only ciphertext, the guest sees its own
;; bytes, and the provider's host sees neither the key nor the plaintext on disk. The keystream
;; of the 8-byte word w of the disk is splitmix64(KEY ^ w) - a DEMONSTRATION of the hook, not
;; a cipher to trust: build a real one (ChaCha20, AES-XTS) from Rust for use, with the same
;; two exports. The key is the data at 0; edit it and install your own.
;; A 256 KiB request takes about 1.3 million units of fuel: the provider must grant more than
;; the default (`--ext-policy fuel=4M`).
;;   xcloud ctl SOCK ext add extensions/disk-cipher.wat --name cipher   # before the first write
;; Figures: bytes_encrypted, bytes_decrypted.
(module
  ;; 0: the key; 16-31: figures; 64-127: names; 65536: the data buffer (up to 1 MiB).
  (memory (export "memory") 17)
  (data (i32.const 0) "\5a\c3\10\77\e9\24\b8\01")
  (func (export "block_buffer") (param $len i32) (result i32)
    (if (result i32) (i32.gt_u (local.get $len) (i32.const 1048576))
      (then (i32.const -1))
      (else (i32.const 65536))))
  (func $mix (param $z i64) (result i64)
    (local.set $z (i64.mul (i64.xor (local.get $z) (i64.shr_u (local.get $z) (i64.const 30))) (i64.const 0xbf58476d1ce4e5b9)))
    (local.set $z (i64.mul (i64.xor (local.get $z) (i64.shr_u (local.get $z) (i64.const 27))) (i64.const 0x94d049bb133111eb)))
    (i64.xor (local.get $z) (i64.shr_u (local.get $z) (i64.const 31))))
  (func (export "block_data") (param $disk i32) (param $kind i32) (param $sector i64) (param $len i32) (result i32)
    (local $at i32) (local $end i32) (local $word i64) (local $key i64)
    ;; Requests are whole sectors, so whole words.
    (if (i32.and (local.get $len) (i32.const 7)) (then (return (i32.const 1))))
    (local.set $key (i64.xor (i64.load (i32.const 0)) (i64.extend_i32_u (local.get $disk))))
    (local.set $word (i64.shl (local.get $sector) (i64.const 6)))
    (local.set $at (i32.const 65536))
    (local.set $end (i32.add (i32.const 65536) (local.get $len)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $at) (local.get $end)))
        (i64.store (local.get $at)
          (i64.xor (i64.load (local.get $at)) (call $mix (i64.xor (local.get $key) (local.get $word)))))
        (local.set $word (i64.add (local.get $word) (i64.const 1)))
        (local.set $at (i32.add (local.get $at) (i32.const 8)))
        (br $next)))
    ;; virtio-blk: 0 a read (decrypted), 1 a write (encrypted).
    (if (local.get $kind)
      (then (i64.store (i32.const 16) (i64.add (i64.load (i32.const 16)) (i64.extend_i32_u (local.get $len)))))
      (else (i64.store (i32.const 24) (i64.add (i64.load (i32.const 24)) (i64.extend_i32_u (local.get $len))))))
    (i32.const 0))
  (func (export "metric_count") (result i32) (i32.const 2))
  (func (export "metric") (param $i i32) (result i64)
    (i64.load (i32.add (i32.const 16) (i32.shl (local.get $i) (i32.const 3)))))
  (data (i32.const 64) "bytes_encrypted" "bytes_decrypted")
  (func (export "metric_name") (param $i i32) (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (i32.add (i32.const 64) (i32.mul (local.get $i) (i32.const 15)))) (i64.const 32))
      (i64.const 15))))
