//! A multiboot (v1) loader, as QEMU's `-kernel` does it: find the header in
//! the first 8 KiB, load an ELF32 executable's `PT_LOAD` segments (or, with
//! header flag 16, the a.out kludge's addresses), and build the boot
//! information — lower/upper memory, a command line and a memory map — in
//! guest memory. The entry state (EAX = [`BOOTLOADER_MAGIC`], EBX = the
//! information's address, 32-bit protected mode, paging off) is the VMM's.
//!
//! Everything in the image is untrusted: sizes and addresses are checked,
//! and a bad image is an [`Error`], never a panic.

use crate::{Error, GuestWrite, Result};

/// The magic in a kernel's multiboot header.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// The magic a multiboot loader leaves in EAX.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Where the boot information structure is placed.
pub const INFO_ADDR: u64 = 0x9000;
const MMAP_ADDR: u64 = INFO_ADDR + 0x100;
const CMDLINE_ADDR: u64 = INFO_ADDR + 0x200;
const CMDLINE_MAX: usize = 0xe00 - 1;
const SEARCH_LEN: usize = 8192;
/// End of conventional memory (the top of "lower" memory).
const LOWER_END: u64 = 0x9_fc00;
const HIGH_START: u64 = 0x10_0000;

// Boot-information flags.
const INFO_MEM: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MMAP: u32 = 1 << 6;
const HEADER_AOUT_KLUDGE: u32 = 1 << 16;

/// What the VMM needs to enter the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boot {
    /// The entry point (physical).
    pub entry: u32,
    /// The boot information's address (for EBX).
    pub info: u32,
    /// The highest address the image occupies (exclusive).
    pub image_end: u64,
}

fn u32_at(image: &[u8], offset: usize) -> Option<u32> {
    let bytes = image.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn u16_at(image: &[u8], offset: usize) -> Option<u16> {
    let bytes = image.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadKernel(msg.into())
}

/// The multiboot header: its offset in the image and flags.
fn find_header(image: &[u8]) -> Option<(usize, u32)> {
    let end = image.len().min(SEARCH_LEN);
    (0..end.saturating_sub(11)).step_by(4).find_map(|off| {
        let magic = u32_at(image, off)?;
        let flags = u32_at(image, off + 4)?;
        let sum = u32_at(image, off + 8)?;
        (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0).then_some((off, flags))
    })
}

struct Placer<'a> {
    mem: &'a mut dyn GuestWrite,
    ram: u64,
}

impl Placer<'_> {
    fn check(&self, what: &'static str, addr: u64, len: u64) -> Result<()> {
        let end = addr.checked_add(len).ok_or_else(|| bad(format!("{what} size overflows")))?;
        if end > self.ram {
            return Err(Error::OutsideRam { what, addr, end, ram: self.ram });
        }
        Ok(())
    }

    fn put(&mut self, what: &'static str, addr: u64, data: &[u8]) -> Result<()> {
        self.check(what, addr, data.len() as u64)?;
        self.mem.write(addr, data).map_err(|()| Error::GuestWrite(addr))
    }

    fn zero(&mut self, what: &'static str, addr: u64, len: u64) -> Result<()> {
        self.check(what, addr, len)?;
        const CHUNK: u64 = 64 * 1024;
        let zeros = vec![0u8; 64 * 1024];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let at = addr + done;
            let slice = zeros.get(..usize::try_from(n).unwrap_or(0)).unwrap_or(&[]);
            self.mem.write(at, slice).map_err(|()| Error::GuestWrite(at))?;
            done += n;
        }
        Ok(())
    }
}

/// Loads an ELF32 image's segments; returns (entry, end of image).
fn load_elf(image: &[u8], placer: &mut Placer<'_>) -> Result<(u32, u64)> {
    if image.get(4) != Some(&1) || image.get(5) != Some(&1) {
        return Err(bad("not a little-endian ELF32 file (a 64-bit ELF needs the a.out kludge)"));
    }
    if u16_at(image, 18) != Some(3) {
        return Err(bad("ELF machine is not i386"));
    }
    let entry = u32_at(image, 24).ok_or_else(|| bad("truncated ELF header"))?;
    let phoff = u32_at(image, 28).ok_or_else(|| bad("truncated ELF header"))? as usize;
    let phentsize = usize::from(u16_at(image, 42).ok_or_else(|| bad("truncated ELF header"))?);
    let phnum = usize::from(u16_at(image, 44).ok_or_else(|| bad("truncated ELF header"))?);
    if phentsize < 32 {
        return Err(bad(format!("ELF program header size {phentsize} is too small")));
    }
    let mut end = 0u64;
    let mut loaded = 0;
    for i in 0..phnum {
        let ph = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(|| bad("ELF program header offset overflows"))?;
        let field = |n: usize| u32_at(image, ph + n).ok_or_else(|| bad("truncated ELF program header"));
        if field(0)? != 1 {
            continue; // not PT_LOAD
        }
        let (offset, paddr, filesz, memsz) =
            (field(4)? as usize, u64::from(field(12)?), field(16)? as usize, u64::from(field(20)?));
        if (filesz as u64) > memsz {
            return Err(bad("ELF segment's file size exceeds its memory size"));
        }
        let data = offset
            .checked_add(filesz)
            .and_then(|e| image.get(offset..e))
            .ok_or_else(|| bad("ELF segment lies outside the file"))?;
        placer.put("ELF segment", paddr, data)?;
        placer.zero("ELF segment (bss)", paddr + filesz as u64, memsz - filesz as u64)?;
        end = end.max(paddr + memsz);
        loaded += 1;
    }
    if loaded == 0 {
        return Err(bad("ELF file has no loadable segment"));
    }
    Ok((entry, end))
}

/// Loads with the a.out kludge's addresses (header flag 16).
fn load_aout(image: &[u8], header: usize, placer: &mut Placer<'_>) -> Result<(u32, u64)> {
    let field = |n: usize| u32_at(image, header + n).ok_or_else(|| bad("truncated multiboot header"));
    let (header_addr, load_addr, load_end, bss_end, entry) =
        (field(12)?, field(16)?, field(20)?, field(24)?, field(28)?);
    let header_off = u32::try_from(header).map_err(|_| bad("header offset"))?;
    let file_start = header_addr
        .checked_sub(load_addr)
        .and_then(|d| header_off.checked_sub(d))
        .ok_or_else(|| bad("a.out kludge: header_addr below load_addr or before the file"))?
        as usize;
    let len = if load_end == 0 {
        image.len().checked_sub(file_start).ok_or_else(|| bad("a.out kludge: load start past the file"))?
    } else {
        load_end.checked_sub(load_addr).ok_or_else(|| bad("a.out kludge: load_end below load_addr"))? as usize
    };
    let data = file_start
        .checked_add(len)
        .and_then(|e| image.get(file_start..e))
        .ok_or_else(|| bad("a.out kludge: image shorter than load range"))?;
    placer.put("a.out image", u64::from(load_addr), data)?;
    let mut end = u64::from(load_addr) + len as u64;
    if bss_end != 0 {
        let bss =
            u64::from(bss_end).checked_sub(end).ok_or_else(|| bad("a.out kludge: bss_end below load end"))?;
        placer.zero("a.out bss", end, bss)?;
        end = u64::from(bss_end);
    }
    Ok((entry, end))
}

/// Loads `image` into guest RAM of `ram_size` bytes (from GPA 0), with
/// command line `cmdline`, and writes the boot information at
/// [`INFO_ADDR`].
pub fn load(image: &[u8], cmdline: &str, ram_size: u64, mem: &mut dyn GuestWrite) -> Result<Boot> {
    let (header, flags) = find_header(image).ok_or_else(|| bad("no multiboot header in the first 8 KiB"))?;
    if ram_size < 2 * HIGH_START {
        return Err(bad(format!("guest RAM {ram_size:#x} is too small for a multiboot kernel")));
    }
    let mut placer = Placer { mem, ram: ram_size };
    let (entry, image_end) = if flags & HEADER_AOUT_KLUDGE != 0 {
        load_aout(image, header, &mut placer)?
    } else if image.starts_with(b"\x7fELF") {
        load_elf(image, &mut placer)?
    } else {
        return Err(bad("neither ELF nor a multiboot a.out kludge"));
    };
    // The boot information is written last, so it wins over a kernel that
    // (unusually) loads below 1 MiB on top of it.
    let mut line = cmdline.as_bytes().to_vec();
    line.truncate(CMDLINE_MAX);
    line.push(0);
    placer.put("command line", CMDLINE_ADDR, &line)?;

    // Memory map: entries are {size (of the rest, 20), base u64, length u64, type u32}.
    let mut mmap = Vec::new();
    for (base, len) in [(0, LOWER_END), (HIGH_START, ram_size - HIGH_START)] {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&u64::to_le_bytes(base));
        mmap.extend_from_slice(&u64::to_le_bytes(len));
        mmap.extend_from_slice(&1u32.to_le_bytes());
    }
    placer.put("memory map", MMAP_ADDR, &mmap)?;

    let upper_kib = u32::try_from((ram_size - HIGH_START) / 1024).unwrap_or(u32::MAX);
    let mut info = [0u32; 22];
    info[0] = INFO_MEM | INFO_CMDLINE | INFO_MMAP;
    info[1] = u32::try_from(LOWER_END / 1024).unwrap_or(0);
    info[2] = upper_kib;
    info[4] = u32::try_from(CMDLINE_ADDR).unwrap_or(0);
    info[11] = u32::try_from(mmap.len()).unwrap_or(0);
    info[12] = u32::try_from(MMAP_ADDR).unwrap_or(0);
    let bytes: Vec<u8> = info.iter().flat_map(|v| v.to_le_bytes()).collect();
    placer.put("boot information", INFO_ADDR, &bytes)?;
    Ok(Boot { entry, info: u32::try_from(INFO_ADDR).unwrap_or(0), image_end })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ram(Vec<u8>);

    impl GuestWrite for Ram {
        fn write(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), ()> {
            let start = usize::try_from(gpa).map_err(|_| ())?;
            let dst = self.0.get_mut(start..start + data.len()).ok_or(())?;
            dst.copy_from_slice(data);
            Ok(())
        }
    }

    impl Ram {
        fn u32(&self, gpa: u64) -> u32 {
            u32_at(&self.0, usize::try_from(gpa).unwrap()).unwrap()
        }

        fn bytes(&self, gpa: u64, len: usize) -> &[u8] {
            let start = usize::try_from(gpa).unwrap();
            &self.0[start..start + len]
        }
    }

    const RAM: u64 = 8 << 20;
    const RAM_BYTES: usize = 8 << 20;

    /// An ELF32 file with one PT_LOAD: `code` at 0x200000, memsz `code + 16`.
    fn elf(code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x100];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 1;
        f[5] = 1;
        f[18] = 3;
        f[24..28].copy_from_slice(&0x20_0000u32.to_le_bytes());
        f[28..32].copy_from_slice(&52u32.to_le_bytes());
        f[42..44].copy_from_slice(&32u16.to_le_bytes());
        f[44..46].copy_from_slice(&1u16.to_le_bytes());
        let ph = 52;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        f[ph + 4..ph + 8].copy_from_slice(&0xc0u32.to_le_bytes());
        f[ph + 12..ph + 16].copy_from_slice(&0x20_0000u32.to_le_bytes());
        let len = u32::try_from(code.len()).unwrap();
        f[ph + 16..ph + 20].copy_from_slice(&len.to_le_bytes());
        f[ph + 20..ph + 24].copy_from_slice(&(len + 16).to_le_bytes());
        // multiboot header at 0x90
        f[0x90..0x94].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        f[0x98..0x9c].copy_from_slice(&0u32.wrapping_sub(HEADER_MAGIC).to_le_bytes());
        f.truncate(0xc0);
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn elf_segments_are_loaded_at_their_physical_address() {
        let mut ram = Ram(vec![0xaa; RAM_BYTES]);

        let boot = load(&elf(&[1, 2, 3, 4]), "k", RAM, &mut ram).unwrap();

        assert_eq!(boot.entry, 0x20_0000);
        assert_eq!(&ram.0[0x20_0000..0x20_0006], &[1, 2, 3, 4, 0, 0]);
        assert_eq!(boot.image_end, 0x20_0014);
    }

    #[test]
    fn boot_information_describes_memory_and_command_line() {
        let mut ram = Ram(vec![0; RAM_BYTES]);

        let boot = load(&elf(&[0x90]), "test.flat", RAM, &mut ram).unwrap();

        assert_eq!(u64::from(boot.info), INFO_ADDR);
        assert_eq!(ram.u32(INFO_ADDR), INFO_MEM | INFO_CMDLINE | INFO_MMAP);
        assert_eq!(u64::from(ram.u32(INFO_ADDR + 8)), (RAM - HIGH_START) / 1024);
        assert_eq!(ram.bytes(CMDLINE_ADDR, 10), b"test.flat\0");
        assert_eq!(ram.u32(INFO_ADDR + 44), 48);
    }

    #[test]
    fn image_without_multiboot_header_is_rejected() {
        let mut ram = Ram(vec![0; RAM_BYTES]);

        let err = load(b"\x7fELF not a kernel", "", RAM, &mut ram).unwrap_err();

        assert!(matches!(err, Error::BadKernel(_)));
    }

    #[test]
    fn segment_beyond_ram_is_rejected() {
        let mut ram = Ram(vec![0; 0x20_0000]);

        let err = load(&elf(&[1]), "", 0x20_0000, &mut ram).unwrap_err();

        assert!(matches!(err, Error::OutsideRam { .. }));
    }

    #[test]
    fn truncated_program_headers_are_rejected() {
        let mut image = elf(&[1]);
        image[44..46].copy_from_slice(&200u16.to_le_bytes());
        let mut ram = Ram(vec![0; RAM_BYTES]);

        let err = load(&image, "", RAM, &mut ram).unwrap_err();

        assert!(matches!(err, Error::BadKernel(_)));
    }

    #[test]
    fn aout_kludge_loads_from_the_header_addresses() {
        let mut image = vec![0u8; 64];
        let fields = [
            HEADER_MAGIC,
            HEADER_AOUT_KLUDGE,
            0u32.wrapping_sub(HEADER_MAGIC + HEADER_AOUT_KLUDGE),
            0x10_0000,
            0x10_0000,
            0,
            0x10_1000,
            0x10_0020,
        ];
        for (i, v) in fields.iter().enumerate() {
            image[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        image[40] = 0xf4;
        let mut ram = Ram(vec![0xaa; RAM_BYTES]);

        let boot = load(&image, "", RAM, &mut ram).unwrap();

        assert_eq!(boot.entry, 0x10_0020);
        assert_eq!(ram.0[0x10_0028], 0xf4);
        assert_eq!(ram.0[0x10_0fff], 0);
        assert_eq!(boot.image_end, 0x10_1000);
    }
}
