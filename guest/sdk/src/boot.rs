//! The PVH entry stub: the only code of a guest that runs at CPL0.
//!
//! On hosts without hardware virtualization for guests (PVM) every CPL0 instruction is emulated
//! (~1000x slower) and any trap at CPL3 kills the guest, so the stub is straight-line code of
//! about 30 instructions: no loops. The page tables are built at link time (an identity map of
//! the first 4 GiB with 2 MiB user pages) and the TSS grants every I/O port, so the stub only
//! loads them, enters long mode and drops to CPL3 with IOPL=3 and IF=0.
//!
//! GDT layout (selectors): 0x08 kernel code64, 0x10 kernel data, 0x18 user data, 0x20 user
//! code64, 0x28 TSS (16 bytes).

core::arch::global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long _pvh_start
    .balign 4
    .popsection

    .pushsection .text.boot, "ax"
    .code32
    .globl _pvh_start
_pvh_start:
    /* %ebx holds the physical address of hvm_start_info; keep it until the drop to CPL3. */
    lgdt    (__xcloud_gdt_ptr)
    /* Patch the TSS base into its descriptor (a link-time symbol cannot be split into the
       descriptor's three base fields by the assembler). */
    mov     $__xcloud_tss, %eax
    mov     %ax, (__xcloud_gdt + 0x28 + 2)
    shr     $16, %eax
    mov     %al, (__xcloud_gdt + 0x28 + 4)
    mov     %ah, (__xcloud_gdt + 0x28 + 7)
    /* CR4: PAE, OSFXSR, OSXMMEXCPT (SSE usable at CPL3). */
    mov     %cr4, %eax
    or      $0x620, %eax
    mov     %eax, %cr4
    mov     $__xcloud_pml4, %eax
    mov     %eax, %cr3
    /* EFER.LME */
    mov     $0xC0000080, %ecx
    rdmsr
    or      $0x100, %eax
    wrmsr
    /* CR0: PG, NE, MP on; EM off. */
    mov     %cr0, %eax
    and     $0xFFFFFFFB, %eax
    or      $0x80000022, %eax
    mov     %eax, %cr0
    ljmp    $0x08, $1f
    .code64
1:
    mov     $0x28, %ax
    ltr     %ax
    mov     %ebx, %edi
    mov     $__xcloud_boot_stack_top, %rsp
    pushq   $0x1b               /* ss: user data */
    pushq   $__xcloud_boot_stack_top
    pushq   $0x3002             /* rflags: IOPL=3, IF=0 */
    pushq   $0x23               /* cs: user code64 */
    pushq   $__xcloud_user_entry
    iretq
    .popsection

    /* First CPL3 code: call into Rust with a correctly aligned stack. */
    .pushsection .text, "ax"
    .globl __xcloud_user_entry
__xcloud_user_entry:
    call    __xcloud_start
2:  pause
    jmp     2b

    /* Entry of secondary vCPUs (the VMM starts them here at CPL3, rsp 16-byte aligned,
       rdi = argument). */
    .globl __xcloud_ap_entry
__xcloud_ap_entry:
    call    __xcloud_ap_start
3:  pause
    jmp     3b
    .popsection

    .pushsection .data.pagetables, "aw"
    .balign 4096
    .globl __xcloud_pml4
__xcloud_pml4:
    .quad   __xcloud_pdpt + 0x7
    .fill   511, 8, 0
__xcloud_pdpt:
    .quad   __xcloud_pd + 0x7
    .quad   __xcloud_pd + 0x1000 + 0x7
    .quad   __xcloud_pd + 0x2000 + 0x7
    .quad   __xcloud_pd + 0x3000 + 0x7
    .fill   508, 8, 0
__xcloud_pd:
    .set    page, 0
    .rept   2048
    .quad   (page << 21) | 0x87  /* present, writable, user, 2 MiB */
    .set    page, page + 1
    .endr
    .popsection

    .pushsection .data, "aw"
    .balign 16
    .globl __xcloud_gdt
__xcloud_gdt:
    .quad   0
    .quad   0x00af9b000000ffff  /* 0x08 kernel code64 */
    .quad   0x00cf93000000ffff  /* 0x10 kernel data */
    .quad   0x00cff3000000ffff  /* 0x18 user data */
    .quad   0x00affb000000ffff  /* 0x20 user code64 */
    .quad   0x0000890000002068  /* 0x28 TSS: limit 0x2068, available 64-bit TSS, base patched */
    .quad   0
__xcloud_gdt_end:
    .balign 8
__xcloud_gdt_ptr:
    .word   __xcloud_gdt_end - __xcloud_gdt - 1
    .long   __xcloud_gdt
    .balign 16
    /* 64-bit TSS: I/O bitmap at 0x68 (all zero: every port allowed), then the 0xff end byte. */
__xcloud_tss:
    .fill   0x66, 1, 0
    .word   0x68
    .fill   0x2000, 1, 0
    .byte   0xff
    .popsection

    .pushsection .bss, "aw", @nobits
    .balign 4096
    .globl __xcloud_boot_stack_top
__xcloud_boot_stack:
    .skip   256 * 1024
__xcloud_boot_stack_top:
    .popsection
"#,
    options(att_syntax)
);
