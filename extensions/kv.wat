;; kv: a key-value store a guest reaches through four ports of the extension window
;; (docs/extensions.md, "Example modules"). Install it with
;;   xcloud ctl SOCK ext add extensions/kv.wat --name kv --ports 0x5000+16
;; Its ports, from the base it is given:
;;   +0   read: the magic 0x6b760001 ("kv", version 1)
;;   +4   write: the key (0..4095) the next access at +8 is about
;;   +8   write: store the value under the key; read: its value (all ones: none stored, or a
;;        key out of range)
;;   +12  read: how many values were stored
;; It exports one figure: the values stored. Its state (every value, the key, the count) goes
;; with the VM through snapshots and migrations.
(module
  ;; One page: 4096 values of 4 bytes from 0, a byte each at 16384 saying it is stored.
  (memory (export "memory") 1)
  (global $key (mut i32) (i32.const 0))
  (global $stores (mut i32) (i32.const 0))
  (func $in_range (result i32)
    (i32.lt_u (global.get $key) (i32.const 4096)))
  (func (export "port_read") (param $offset i32) (param $size i32) (result i32)
    (if (i32.eq (local.get $offset) (i32.const 0))
      (then (return (i32.const 0x6b760001))))
    (if (i32.eq (local.get $offset) (i32.const 12))
      (then (return (global.get $stores))))
    (if (i32.eq (local.get $offset) (i32.const 8))
      (then
        (if (call $in_range)
          (then
            (if (i32.load8_u (i32.add (i32.const 16384) (global.get $key)))
              (then (return (i32.load (i32.shl (global.get $key) (i32.const 2))))))))))
    (i32.const -1))
  (func (export "port_write") (param $offset i32) (param $size i32) (param $value i32)
    (if (i32.eq (local.get $offset) (i32.const 4))
      (then
        (global.set $key (local.get $value))
        (return)))
    (if (i32.and (i32.eq (local.get $offset) (i32.const 8)) (call $in_range))
      (then
        (i32.store (i32.shl (global.get $key) (i32.const 2)) (local.get $value))
        (i32.store8 (i32.add (i32.const 16384) (global.get $key)) (i32.const 1))
        (global.set $stores (i32.add (global.get $stores) (i32.const 1))))))
  ;; The state: the values and their flags as they are (0 to 20480), then the key and the
  ;; count (20480, 20484): 20488 bytes from 0.
  (func (export "state_save") (result i64)
    (i32.store (i32.const 20480) (global.get $key))
    (i32.store (i32.const 20484) (global.get $stores))
    (i64.const 20488))
  (func (export "state_buffer") (param $len i32) (result i32)
    (if (result i32) (i32.eq (local.get $len) (i32.const 20488))
      (then (i32.const 0))
      (else (i32.const -1))))
  (func (export "state_load") (param $len i32) (result i32)
    (if (i32.ne (local.get $len) (i32.const 20488)) (then (return (i32.const 1))))
    (global.set $key (i32.load (i32.const 20480)))
    (global.set $stores (i32.load (i32.const 20484)))
    (i32.const 0))
  (func (export "metric_count") (result i32)
    (i32.const 1))
  (func (export "metric") (param $index i32) (result i64)
    (i64.extend_i32_u (global.get $stores))))
