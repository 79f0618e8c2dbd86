;; block-audit: an audit log of what the guest writes to its disks (docs/extensions.md,
;; "Example modules"). It sees every block request before the disk does it, counts the writes
;; and their bytes, keeps the last 256 writes (disk, sector, bytes) in a ring, and refuses any
;; write to the first 8 sectors of a disk (a boot sector and partition table nobody should
;; rewrite while the VM runs): the guest gets an I/O error and the image is untouched.
;;   xcloud ctl SOCK ext add extensions/block-audit.wat --name audit
;; Figures: writes, bytes_written, refused, reads, last_sector, last_bytes.
(module
  (memory (export "memory") 1)
  ;; Counters at 0: writes, bytes_written, refused, reads, last_sector, last_bytes (i64).
  ;; The ring at 4096: 256 entries of 16 bytes (sector, bytes << 8 | disk); its next slot at 64.
  (func $add (param $at i32) (param $n i64)
    (i64.store (local.get $at) (i64.add (i64.load (local.get $at)) (local.get $n))))
  (func (export "block") (param $disk i32) (param $kind i32) (param $sector i64) (param $bytes i64) (result i32)
    (local $slot i32)
    ;; virtio-blk request types: 0 read, 1 write.
    (if (i32.eqz (local.get $kind))
      (then
        (call $add (i32.const 24) (i64.const 1))
        (return (i32.const 0))))
    (if (i32.ne (local.get $kind) (i32.const 1)) (then (return (i32.const 0))))
    (if (i64.lt_u (local.get $sector) (i64.const 8))
      (then
        (call $add (i32.const 16) (i64.const 1))
        (return (i32.const 1))))
    (call $add (i32.const 0) (i64.const 1))
    (call $add (i32.const 8) (local.get $bytes))
    (i64.store (i32.const 32) (local.get $sector))
    (i64.store (i32.const 40) (local.get $bytes))
    (local.set $slot (i32.add (i32.const 4096) (i32.shl (i32.load (i32.const 64)) (i32.const 4))))
    (i64.store (local.get $slot) (local.get $sector))
    (i64.store offset=8 (local.get $slot)
      (i64.or (i64.shl (local.get $bytes) (i64.const 8)) (i64.extend_i32_u (i32.and (local.get $disk) (i32.const 255)))))
    (i32.store (i32.const 64) (i32.and (i32.add (i32.load (i32.const 64)) (i32.const 1)) (i32.const 255)))
    (i32.const 0))
  (func (export "metric_count") (result i32) (i32.const 6))
  (func (export "metric") (param $i i32) (result i64)
    (i64.load (i32.shl (local.get $i) (i32.const 3))))
  ;; Names at 2048, 16 bytes apart.
  (data (i32.const 2048) "writes\00\00\00\00\00\00\00\00\00\00bytes_written\00\00\00refused\00\00\00\00\00\00\00\00\00reads\00\00\00\00\00\00\00\00\00\00\00last_sector\00\00\00\00\00last_bytes")
  (func (export "metric_name") (param $i i32) (result i64)
    (local $at i32) (local $len i32)
    (local.set $at (i32.add (i32.const 2048) (i32.shl (local.get $i) (i32.const 4))))
    (block $end
      (loop $next
        (br_if $end (i32.ge_u (local.get $len) (i32.const 16)))
        (br_if $end (i32.eqz (i32.load8_u (i32.add (local.get $at) (local.get $len)))))
        (local.set $len (i32.add (local.get $len) (i32.const 1)))
        (br $next)))
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $at)) (i64.const 32))
      (i64.extend_i32_u (local.get $len)))))
