//! Booting PVH guests that are not xcloud's: tiny guests written in assembly here, built with
//! `cc` at test time, running at CPL0 in 32-bit protected mode as the PVH protocol starts them.

mod common;
use common::*;

/// Writes the NUL-terminated string at `msg` to COM1, byte by byte.
const SERIAL_PUTS: &str = r#"
puts:
    movb (%esi), %al
    test %al, %al
    jz 9f
    mov $0x3f8, %dx
    outb %al, %dx
    inc %esi
    jmp puts
9:  ret
"#;

#[test]
fn an_assembly_pvh_guest_boots_prints_on_the_uart_and_exits_by_hypercall() {
    let source = format!(
        r#"{PVH_NOTE}
    .text
    .code32
    .globl _start
_start:
    mov $stack_top, %esp
    cmpl $0x336ec578, (%ebx)       /* hvm_start_info.magic */
    jne bad_info
    mov $msg, %esi
    call puts
    mov 24(%ebx), %esi             /* cmdline_paddr (low half) */
    call puts
    mov $nl, %esi
    call puts
    mov $0x5843, %dx
    mov $exit_block, %eax
    outl %eax, %dx
1:  jmp 1b
bad_info:
    mov $bad, %esi
    call puts
    ud2
{SERIAL_PUTS}
    .data
    .balign 8
exit_block:
    .long 2, 0                     /* op Exit, flags */
    .quad 0                        /* result */
    .quad 7, 0, 0, 0, 0, 0         /* status 7 */
msg: .asciz "hello from a PVH guest written in assembly, cmdline: "
nl:  .asciz "\n"
bad: .asciz "bad hvm_start_info\n"
    .bss
    .balign 16
    .skip 4096
stack_top:
"#
    );
    let elf = build_asm_guest("asm-hello", &source);
    let out = run(&[
        "run",
        "--mem",
        "16M",
        elf.to_str().expect("utf-8 path"),
        "--",
        "one",
        "two",
    ]);
    assert_eq!(
        stdout(&out),
        "hello from a PVH guest written in assembly, cmdline: one two\n",
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(7), "stderr: {}", stderr(&out));
}

#[test]
fn a_triple_fault_is_reported_as_a_crash_with_rip() {
    let source = format!(
        r#"{PVH_NOTE}
    .text
    .code32
    .globl _start
_start:
    nop
    ud2                             /* no IDT: #UD -> #GP -> #DF -> triple fault */
"#
    );
    let elf = build_asm_guest("asm-crash", &source);
    let out = run(&["run", "--mem", "16M", elf.to_str().expect("utf-8 path")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "stderr: {err}");
    assert!(err.contains("guest crashed: vCPU 0"), "{err}");
    assert!(err.contains("triple-faulted") && err.contains("RIP 0x"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line, not a backtrace: {err}");
}

#[test]
fn garbage_on_ports_mmio_and_hypercalls_is_ignored_or_refused() {
    let source = format!(
        r#"{PVH_NOTE}
    .text
    .code32
    .globl _start
_start:
    mov $stack_top, %esp
    /* Every port from 0 to 0x5fff gets a byte of garbage, then is read back. */
    xor %ecx, %ecx
1:  mov %cx, %dx
    mov %cl, %al
    xor $0x5a, %al
    outb %al, %dx
    inb %dx, %al
    inc %ecx
    cmp $0x6000, %ecx
    jne 1b
    /* 16- and 32-bit garbage on the hypercall port: wrong sizes, unaligned, outside RAM. */
    mov $0x5843, %dx
    mov $0xdead, %ax
    outw %ax, %dx
    mov $0x1003, %eax
    outl %eax, %dx
    mov $0xfffffff8, %eax
    outl %eax, %dx
    /* MMIO reads and writes to nothing. */
    movl $0x12345678, 0xd0000000
    mov 0xd0000000, %eax
    /* Hypercalls with a bad op, a console write outside RAM, a bogus vCPU start. */
    mov $bad_op, %eax
    outl %eax, %dx
    mov $bad_write, %eax
    outl %eax, %dx
    mov $bad_start, %eax
    outl %eax, %dx
    /* Report the results the VMM wrote back: each must be negative (refused). */
    cmpl $0, bad_op + 12
    jge fail
    cmpl $0, bad_write + 12
    jge fail
    cmpl $0, bad_start + 12
    jge fail
    mov $ok_write, %eax
    outl %eax, %dx
    mov $exit_block, %eax
    outl %eax, %dx
2:  jmp 2b
fail:
    mov $fail_block, %eax
    outl %eax, %dx
3:  jmp 3b
    .data
    .balign 8
bad_op:      .long 0xdead, 0
             .quad 0
             .quad 0, 0, 0, 0, 0, 0
bad_write:   .long 1, 0
             .quad 0
             .quad 0xfffff000, 0x10000, 0, 0, 0, 0
bad_start:   .long 7, 0
             .quad 0
             .quad 5, 0x100000, 0x200000, 0, 0, 0
ok_write:    .long 1, 0
             .quad 0
             .quad msg, msg_end - msg, 0, 0, 0, 0
exit_block:  .long 2, 0
             .quad 0
             .quad 0, 0, 0, 0, 0, 0
fail_block:  .long 2, 0
             .quad 0
             .quad 9, 0, 0, 0, 0, 0
msg: .ascii "the VMM survived the garbage\n"
msg_end:
    .bss
    .balign 16
    .skip 4096
stack_top:
"#
    );
    let elf = build_asm_guest("asm-garbage", &source);
    let out = run(&["run", "--mem", "16M", elf.to_str().expect("utf-8 path")]);
    assert!(
        stdout(&out).ends_with("the VMM survived the garbage\n"),
        "stdout: {} stderr: {}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("ignored guest access"),
        "garbage is logged: {}",
        stderr(&out)
    );
}
