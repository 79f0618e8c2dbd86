;; packet-counter: counts the frames and bytes of every virtio NIC of the VM, each way, and the
;; IPv4 TCP segments that open a connection (SYN without ACK) coming in (docs/extensions.md,
;; "Example modules"). It passes every frame as it is. Install it with
;;   xcloud ctl SOCK ext add extensions/packet-counter.wat --name counter
;; and read its figures with `ext ls`: frames_in, bytes_in, frames_out, bytes_out, syns_in.
(module
  (memory (export "memory") 1)
  ;; The first 64 bytes of each frame arrive at 0 (Ethernet 14, IPv4 20, TCP flags at 47).
  (func (export "packet_buffer") (result i32) (i32.const 0))
  (func (export "packet_snap") (result i32) (i32.const 64))
  ;; Figures at 1024: frames_in, bytes_in, frames_out, bytes_out, syns_in (i64 each).
  (func $add (param $at i32) (param $n i64)
    (i64.store (local.get $at) (i64.add (i64.load (local.get $at)) (local.get $n))))
  (func $is_syn (param $len i32) (result i32)
    (if (i32.lt_u (local.get $len) (i32.const 54)) (then (return (i32.const 0))))
    ;; EtherType 0x0800 (big-endian), IPv4 with a 20-byte header, protocol 6.
    (if (i32.ne (i32.load16_u (i32.const 12)) (i32.const 0x0008)) (then (return (i32.const 0))))
    (if (i32.ne (i32.load8_u (i32.const 14)) (i32.const 0x45)) (then (return (i32.const 0))))
    (if (i32.ne (i32.load8_u (i32.const 23)) (i32.const 6)) (then (return (i32.const 0))))
    ;; Flags: SYN (0x02) set, ACK (0x10) clear.
    (i32.eq (i32.and (i32.load8_u (i32.const 47)) (i32.const 0x12)) (i32.const 0x02)))
  (func (export "packet") (param $nic i32) (param $direction i32) (param $len i32) (result i32)
    (if (local.get $direction)
      (then
        (call $add (i32.const 1024) (i64.const 1))
        (call $add (i32.const 1032) (i64.extend_i32_u (local.get $len)))
        (if (call $is_syn (local.get $len))
          (then (call $add (i32.const 1056) (i64.const 1)))))
      (else
        (call $add (i32.const 1040) (i64.const 1))
        (call $add (i32.const 1048) (i64.extend_i32_u (local.get $len)))))
    (i32.const 0))
  (func (export "metric_count") (result i32) (i32.const 5))
  (func (export "metric") (param $i i32) (result i64)
    (i64.load (i32.add (i32.const 1024) (i32.shl (local.get $i) (i32.const 3)))))
  ;; Names at 2048, 16 bytes apart; answers address << 32 | length.
  (data (i32.const 2048) "frames_in\00\00\00\00\00\00\00bytes_in\00\00\00\00\00\00\00\00frames_out\00\00\00\00\00\00bytes_out\00\00\00\00\00\00\00syns_in")
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
