;; memscan: a guest-memory scanner (docs/extensions.md, "Example modules"), the kind of
;; introspection an intrusion detector does from outside the guest. At every tick it reads
;; the next 512 KiB of guest RAM (read-only, within the tick's budget) and looks for the
;; marker "xcloud_memscan_marker" at every 8-byte-aligned address; a full sweep starts over.
;;   xcloud ctl SOCK ext add extensions/memscan.wat --name memscan
;; Figures: found_at (the marker's last guest-physical address, -1 before), found (times
;; seen), sweeps (full passes over RAM), scanned_kib.
(module
  (import "xcloud" "guest_read" (func $guest_read (param i64 i32 i32) (result i32)))
  (import "xcloud" "guest_ram_bytes" (func $guest_ram_bytes (result i64)))
  ;; 9 pages: the marker and figures below 4096, the chunk from 4096.
  (memory (export "memory") 9)
  (data (i32.const 0) "xcloud_memscan_marker")
  (global $marker_len i32 (i32.const 21))
  (global $chunk i32 (i32.const 524288))
  (global $next (mut i64) (i64.const 0))
  (global $found_at (mut i64) (i64.const -1))
  (global $found (mut i64) (i64.const 0))
  (global $sweeps (mut i64) (i64.const 0))
  (global $scanned (mut i64) (i64.const 0))
  ;; Whether the marker is at `at` in the chunk (the chunk's last bytes may hold a marker cut
  ;; in two: the next chunk starts 64 bytes early so it is seen whole there).
  (func $matches (param $at i32) (result i32)
    (local $i i32)
    (if (i64.ne (i64.load (local.get $at)) (i64.load (i32.const 0))) (then (return (i32.const 0))))
    (local.set $i (i32.const 8))
    (block $no
      (loop $next
        (br_if $no (i32.ge_u (local.get $i) (global.get $marker_len)))
        (if (i32.ne (i32.load8_u (i32.add (local.get $at) (local.get $i))) (i32.load8_u (local.get $i)))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 1))
  (func (export "tick")
    (local $ram i64) (local $len i32) (local $at i32) (local $end i32)
    (local.set $ram (call $guest_ram_bytes))
    (if (i64.ge_u (global.get $next) (local.get $ram))
      (then
        (global.set $next (i64.const 0))
        (global.set $sweeps (i64.add (global.get $sweeps) (i64.const 1)))))
    (local.set $len (global.get $chunk))
    (if (i64.lt_u (i64.sub (local.get $ram) (global.get $next)) (i64.extend_i32_u (local.get $len)))
      (then (local.set $len (i32.wrap_i64 (i64.sub (local.get $ram) (global.get $next))))))
    ;; A range that is not RAM (a hole) is stepped over.
    (if (call $guest_read (global.get $next) (i32.const 4096) (local.get $len))
      (then
        (global.set $next (i64.add (global.get $next) (i64.extend_i32_u (local.get $len))))
        (return)))
    (global.set $scanned (i64.add (global.get $scanned) (i64.extend_i32_u (local.get $len))))
    (local.set $at (i32.const 4096))
    (local.set $end (i32.sub (i32.add (i32.const 4096) (local.get $len)) (global.get $marker_len)))
    (block $done
      (loop $scan
        (br_if $done (i32.gt_s (local.get $at) (local.get $end)))
        ;; The first 8 bytes are compared here, the rest only where they match: the loop
        ;; must fit a tick's fuel.
        (if (i64.eq (i64.load (local.get $at)) (i64.load (i32.const 0)))
          (then
            (if (call $matches (local.get $at))
              (then
                (global.set $found_at
                  (i64.add (global.get $next) (i64.extend_i32_u (i32.sub (local.get $at) (i32.const 4096)))))
                (global.set $found (i64.add (global.get $found) (i64.const 1)))))))
        (local.set $at (i32.add (local.get $at) (i32.const 8)))
        (br $scan)))
    (if (i32.lt_u (local.get $len) (global.get $chunk))
      (then (global.set $next (local.get $ram)))
      (else (global.set $next (i64.sub (i64.add (global.get $next) (i64.extend_i32_u (local.get $len))) (i64.const 64))))))
  (func (export "metric_count") (result i32) (i32.const 4))
  (func (export "metric") (param $i i32) (result i64)
    (if (i32.eqz (local.get $i)) (then (return (global.get $found_at))))
    (if (i32.eq (local.get $i) (i32.const 1)) (then (return (global.get $found))))
    (if (i32.eq (local.get $i) (i32.const 2)) (then (return (global.get $sweeps))))
    (i64.shr_u (global.get $scanned) (i64.const 10)))
  (data (i32.const 64) "found_at\00\00\00\00\00\00\00\00found\00\00\00\00\00\00\00\00\00\00\00sweeps\00\00\00\00\00\00\00\00\00\00scanned_kib")
  (func (export "metric_name") (param $i i32) (result i64)
    (local $at i32) (local $len i32)
    (local.set $at (i32.add (i32.const 64) (i32.shl (local.get $i) (i32.const 4))))
    (block $end
      (loop $next
        (br_if $end (i32.ge_u (local.get $len) (i32.const 16)))
        (br_if $end (i32.eqz (i32.load8_u (i32.add (local.get $at) (local.get $len)))))
        (local.set $len (i32.add (local.get $len) (i32.const 1)))
        (br $next)))
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $at)) (i64.const 32))
      (i64.extend_i32_u (local.get $len)))))
