;; quick-switch: a tenant's convergence and compression policy for live migration
;; (docs/extensions.md, "Example modules"). It replaces the answers of the provider's built-in
;; pre-copy policy for a VM whose owner wants a migration over quickly rather than the
;; shortest pause: after at most 2 pre-copy rounds it switches to post-copy when the migration
;; allows it, else pauses for stop-and-copy; and it compresses the pages of every round while
;; the link carries less than 100 MB/s (a WAN), sending them plain on a fast link, where
;; compressing would cost more time than it saves.
;;   xcloud ctl SOCK ext add extensions/quick-switch.wat --name quick-switch
;; Figures: decisions, switches (post-copy or stop-and-copy answered), compressed_rounds.
(module
  ;; 0-23: figures (i64: decisions, switches, compressed_rounds); 32-79: names.
  (memory (export "memory") 1)
  (func $add (param $at i32)
    (i64.store (local.get $at) (i64.add (i64.load (local.get $at)) (i64.const 1))))
  (func (export "converge")
    (param $round i32) (param $dirty i64) (param $sent_last i64) (param $bandwidth i64)
    (param $dirty_rate i64) (param $rtt_us i64) (param $budget_us i64) (param $flags i32)
    (result i32)
    (call $add (i32.const 0))
    ;; Two rounds after the first pass: the provider's answer (it may stop sooner).
    (if (i32.lt_u (local.get $round) (i32.const 2)) (then (return (i32.const 0))))
    (call $add (i32.const 8))
    ;; Flag 1: post-copy allowed (answer 4), else stop-and-copy (answer 3).
    (select (i32.const 4) (i32.const 3) (i32.and (local.get $flags) (i32.const 1))))
  (func (export "compress")
    (param $round i32) (param $bandwidth i64) (param $dirty_rate i64) (param $flags i32)
    (result i32)
    (if (i64.lt_s (local.get $bandwidth) (i64.const 100000000))
      (then (call $add (i32.const 16)) (return (i32.const 2))))
    (i32.const 1))
  (func (export "metric_count") (result i32) (i32.const 3))
  (func (export "metric") (param $i i32) (result i64)
    (i64.load (i32.shl (local.get $i) (i32.const 3))))
  (data (i32.const 32) "decisions\00\00\00\00\00\00\00switches\00\00\00\00\00\00\00\00compressed_rounds")
  (func (export "metric_name") (param $i i32) (result i64)
    (local $at i32) (local $len i32)
    (local.set $at (i32.add (i32.const 32) (i32.shl (local.get $i) (i32.const 4))))
    (block $end
      (loop $next
        (br_if $end (i32.ge_u (local.get $len) (i32.const 17)))
        (br_if $end (i32.eqz (i32.load8_u (i32.add (local.get $at) (local.get $len)))))
        (local.set $len (i32.add (local.get $len) (i32.const 1)))
        (br $next)))
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $at)) (i64.const 32))
      (i64.extend_i32_u (local.get $len)))))
