;; hot-last: a page-ordering policy for live migration (docs/extensions.md, "Example
;; modules"). Each pre-copy round it sends first the pages dirtied for the first time and last
;; those dirtied in an earlier round too: a page written again and again is likely to be written
;; again before the round ends, and sent last it is sent once instead of twice. It keeps one
;; byte per guest page (the first 4 GiB): the number of the migration it was last seen dirty
;; in (numbers 1-255 in turn, so that a new migration forgets the last without clearing the
;; table, which would take more than a call's fuel). It exports its counts; they go with the
;; VM through the migration (its state).
;;   xcloud ctl SOCK ext add extensions/hot-last.wat --name hot-last
;; Figures: rounds, ordered_pages, hot_pages (sent last), phases, migrations.
(module
  ;; 0-63: figures (i64: rounds, ordered_pages, hot_pages, phases, migrations); 64-191: names;
  ;; 65536: the seen table (1 Mi pages); 1114112: the page buffer (up to 65536 pages of 8 bytes);
  ;; 1638400: where the buffer's first pass puts the hot pages.
  (memory (export "memory") 33)
  (global $migration (mut i32) (i32.const 1))
  (func $add (param $at i32) (param $n i64)
    (i64.store (local.get $at) (i64.add (i64.load (local.get $at)) (local.get $n))))
  ;; Rounds of more than 16384 pages keep the engine's order: ordering them would take more
  ;; than a call's fuel.
  (func (export "pages_buffer") (param $count i32) (result i32)
    (if (result i32) (i32.gt_u (local.get $count) (i32.const 16384))
      (then (i32.const -1))
      (else (i32.const 1114112))))
  ;; The seen byte of page $pfn (pages past the table count as never seen).
  (func $seen_at (param $pfn i64) (result i32)
    (if (result i32) (i64.ge_u (local.get $pfn) (i64.const 1048576))
      (then (i32.const 0))
      (else (i32.add (i32.const 65536) (i32.wrap_i64 (local.get $pfn))))))
  (func (export "order_pages") (param $count i32) (result i32)
    (local $i i32) (local $cold i32) (local $hot i32) (local $pfn i64) (local $at i32)
    (if (i32.gt_u (local.get $count) (i32.const 16384)) (then (return (i32.const 1))))
    ;; First pass: cold pages stay in the buffer in order, hot ones go aside in order.
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
        (local.set $pfn (i64.load (i32.add (i32.const 1114112) (i32.shl (local.get $i) (i32.const 3)))))
        (local.set $at (call $seen_at (local.get $pfn)))
        (if (i32.and (i32.ne (local.get $at) (i32.const 0)) (i32.eq (i32.load8_u (local.get $at)) (global.get $migration)))
          (then
            (i64.store (i32.add (i32.const 1638400) (i32.shl (local.get $hot) (i32.const 3))) (local.get $pfn))
            (local.set $hot (i32.add (local.get $hot) (i32.const 1))))
          (else
            (i64.store (i32.add (i32.const 1114112) (i32.shl (local.get $cold) (i32.const 3))) (local.get $pfn))
            (local.set $cold (i32.add (local.get $cold) (i32.const 1)))))
        ;; Seen in this migration.
        (if (local.get $at) (then (i32.store8 (local.get $at) (global.get $migration))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    ;; The hot pages after the cold ones.
    (memory.copy
      (i32.add (i32.const 1114112) (i32.shl (local.get $cold) (i32.const 3)))
      (i32.const 1638400)
      (i32.shl (local.get $hot) (i32.const 3)))
    (call $add (i32.const 0) (i64.const 1))
    (call $add (i32.const 8) (i64.extend_i32_u (local.get $count)))
    (call $add (i32.const 16) (i64.extend_i32_u (local.get $hot)))
    (i32.const 0))
  (func (export "phase") (param $phase i32) (param $round i32) (param $pages i64) (param $bytes i64)
    (call $add (i32.const 24) (i64.const 1))
    (if (i32.eq (local.get $phase) (i32.const 6)) (then (call $add (i32.const 32) (i64.const 1))))
    ;; A new migration starts from nothing seen: the next number.
    (if (i32.eq (local.get $phase) (i32.const 1))
      (then (global.set $migration (i32.add (i32.rem_u (global.get $migration) (i32.const 255)) (i32.const 1))))))
  ;; The state: the figures (40 bytes).
  (func (export "state_save") (result i64) (i64.const 40))
  (func (export "state_buffer") (param $len i32) (result i32)
    (select (i32.const 0) (i32.const -1) (i32.eq (local.get $len) (i32.const 40))))
  (func (export "state_load") (param $len i32) (result i32)
    (i32.ne (local.get $len) (i32.const 40)))
  (func (export "metric_count") (result i32) (i32.const 5))
  (func (export "metric") (param $i i32) (result i64)
    (i64.load (i32.shl (local.get $i) (i32.const 3))))
  (data (i32.const 64) "rounds\00\00\00\00\00\00\00\00\00\00ordered_pages\00\00\00hot_pages\00\00\00\00\00\00\00phases\00\00\00\00\00\00\00\00\00\00migrations")
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
