;; packet-filter: a firewall in front of the guest (docs/extensions.md, "Example modules"). It
;; drops IPv4 TCP and UDP frames coming in to a destination port on its block list, and
;; passes everything else; what the guest sends passes too. The list is the data at 1024: a
;; count, then the ports (16 bits each); edit it and install your own. As shipped it blocks
;; 23 (telnet), 5001 (the test suite's netrecv) and 6379.
;;   xcloud ctl SOCK ext add extensions/packet-filter.wat --name firewall
;; Figures: dropped, passed.
(module
  (memory (export "memory") 1)
  (func (export "packet_buffer") (result i32) (i32.const 0))
  ;; Ethernet 14 + IPv4 up to 60 + the ports 4.
  (func (export "packet_snap") (result i32) (i32.const 78))
  (global $dropped (mut i64) (i64.const 0))
  (global $passed (mut i64) (i64.const 0))
  (data (i32.const 1024) "\03\00" "\00\17" "\13\89" "\18\eb")
  (func $blocked (param $port i32) (result i32)
    (local $i i32) (local $count i32)
    (local.set $count (i32.load16_u (i32.const 1024)))
    (block $no
      (loop $next
        (br_if $no (i32.ge_u (local.get $i) (local.get $count)))
        ;; Ports are kept in network order, as they are in the frame.
        (if (i32.eq
              (i32.load16_u (i32.add (i32.const 1026) (i32.shl (local.get $i) (i32.const 1))))
              (local.get $port))
          (then (return (i32.const 1))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0))
  (func $verdict (param $len i32) (result i32)
    (local $ihl i32) (local $proto i32)
    (if (i32.lt_u (local.get $len) (i32.const 34)) (then (return (i32.const 0))))
    (if (i32.ne (i32.load16_u (i32.const 12)) (i32.const 0x0008)) (then (return (i32.const 0))))
    (local.set $ihl (i32.shl (i32.and (i32.load8_u (i32.const 14)) (i32.const 15)) (i32.const 2)))
    (if (i32.lt_u (local.get $ihl) (i32.const 20)) (then (return (i32.const 0))))
    (local.set $proto (i32.load8_u (i32.const 23)))
    (if (i32.and (i32.ne (local.get $proto) (i32.const 6)) (i32.ne (local.get $proto) (i32.const 17)))
      (then (return (i32.const 0))))
    ;; A later fragment carries no ports.
    (if (i32.and (i32.load16_u (i32.const 20)) (i32.const 0xff1f)) (then (return (i32.const 0))))
    (if (i32.lt_u (local.get $len) (i32.add (i32.const 18) (local.get $ihl))) (then (return (i32.const 0))))
    (call $blocked (i32.load16_u (i32.add (i32.const 16) (local.get $ihl)))))
  (func (export "packet") (param $nic i32) (param $direction i32) (param $len i32) (result i32)
    (if (i32.and (local.get $direction) (call $verdict (local.get $len)))
      (then
        (global.set $dropped (i64.add (global.get $dropped) (i64.const 1)))
        (return (i32.const 1))))
    (global.set $passed (i64.add (global.get $passed) (i64.const 1)))
    (i32.const 0))
  (func (export "metric_count") (result i32) (i32.const 2))
  (func (export "metric") (param $i i32) (result i64)
    (select (global.get $passed) (global.get $dropped) (local.get $i)))
  (data (i32.const 2048) "dropped" "passed")
  (func (export "metric_name") (param $i i32) (result i64)
    (select (i64.const 0x0000080700000006) (i64.const 0x0000080000000007) (local.get $i))))
