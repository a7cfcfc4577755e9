//! The DLPack boundary's layout checks: overflow, negative strides, overlap, and the
//! writable-memory probe.

use super::*;

fn t3(shape: &[i64], strides: &[i64], writable: bool) -> Result<Tensor3> {
    // A fake base: layout checks never touch memory.
    let base = 0x1000 as *mut u8;
    Tensor3::new(
        "x",
        base,
        0,
        Device::Cpu,
        DType::F32,
        shape,
        strides,
        writable,
    )
}

#[test]
fn accepts_plain_and_strided_layouts() {
    let t = t3(&[2, 3, 4], &[12, 4, 1], true).unwrap();
    assert_eq!(t.span(), 24);
    // A transposed view of [L, H, D]: rows strided, elements distinct.
    let t = t3(&[3, 2, 4], &[4, 12, 1], true).unwrap();
    assert_eq!(t.span(), 24);
    // Broadcast inputs may repeat elements; outputs may not.
    assert!(t3(&[2, 3, 4], &[0, 4, 1], false).is_ok());
    let e = t3(&[2, 3, 4], &[0, 4, 1], true).unwrap_err().to_string();
    assert!(e.contains("overlap"), "{e}");
}

#[test]
fn rejects_negative_sizes_and_strides() {
    let e = t3(&[2, 3, 4], &[-12, 4, 1], false).unwrap_err().to_string();
    assert!(e.starts_with("x: negative stride"), "{e}");
    let e = t3(&[2, -3, 4], &[12, 4, 1], false).unwrap_err().to_string();
    assert!(e.starts_with("x: negative size"), "{e}");
    let e = t3(&[2, 3, 4], &[12, 8, 2], false).unwrap_err().to_string();
    assert!(e.contains("stride 1"), "{e}");
    assert!(t3(&[2, 3], &[3, 1], false).is_err());
}

#[test]
fn strides_never_stepped_are_ignored() {
    // numpy exports an empty array with every stride 0, and a view flipped over one element
    // with a negative stride: neither stride is ever taken, so neither layout is wrong.
    // Before: "the last dimension must have stride 1" and "negative stride".
    let t = t3(&[1, 0, 3], &[0, 0, 0], true).unwrap();
    assert_eq!(t.span(), 0);
    assert!(t3(&[2, 0, 3], &[-7, 3, 2], true).is_ok());
    let t = t3(&[1, 3, 4], &[-12, 4, 1], true).unwrap();
    assert_eq!(t.span(), 12);
    // An unstepped stride of 0 (or less than a row) reads as the contiguous one: rows of a
    // one-row view are a row apart (the CPU kernel asserts it).
    let t = t3(&[2, 1, 4], &[4, 0, 1], false).unwrap();
    assert_eq!(t.strides, [4, 4, 1]);
    assert!(t3(&[2, 3, 1], &[3, 1, -5], false).is_ok());
    // A stride that is stepped still counts.
    assert!(t3(&[2, 3, 4], &[-12, 4, 1], false).is_err());
    assert!(t3(&[2, 3, 4], &[12, 4, 0], false).is_err());
}

#[test]
fn rejects_layouts_whose_arithmetic_overflows() {
    let big = i64::MAX;
    for (shape, strides) in [
        // shape * stride beyond usize
        ([3, 2, 4], [big, 4, 1]),
        // element count beyond usize, even with no memory behind it (stride 0)
        ([big, big, 4], [0, 0, 1]),
        // span fits usize, its bytes do not
        ([2, 1, 1], [1 << 62, 1, 1]),
    ] {
        let e = t3(&shape, &strides, false).unwrap_err().to_string();
        assert!(e.contains("more memory than can be addressed"), "{e}");
    }
    // The end address overflows.
    let e = Tensor3::new(
        "x",
        usize::MAX as *mut u8,
        0,
        Device::Cpu,
        DType::F32,
        &[1, 1, 4],
        &[4, 4, 1],
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("more memory"), "{e}");
    // An empty tensor with huge strides has no span.
    assert_eq!(t3(&[0, 2, 4], &[big, 4, 1], false).unwrap().span(), 0);
}

#[test]
fn read_only_flag_is_refused() {
    let t = t3(&[1, 1, 4], &[4, 4, 1], true).unwrap();
    let e = t.check_writable("out", true).unwrap_err().to_string();
    assert!(e.starts_with("out: is read-only"), "{e}");
}

#[cfg(target_os = "linux")]
#[test]
fn probe_tells_read_only_pages_from_writable_ones() {
    let page = 4096;
    // SAFETY: an anonymous private mapping of 4 pages, unmapped below.
    let m = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4 * page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(m, libc::MAP_FAILED);
    let base = m as *mut u8;
    // SAFETY: the mapping is 4 pages; fill it with a pattern the probe must preserve.
    unsafe { std::ptr::write_bytes(base, 7, 4 * page) };
    let whole = |writable| {
        // [4, 256, 4] f32 = 4 pages.
        Tensor3::new(
            "out",
            base,
            0,
            Device::Cpu,
            DType::F32,
            &[4, 256, 4],
            &[1024, 4, 1],
            writable,
        )
        .unwrap()
    };
    whole(true).check_writable("out", false).unwrap();
    // SAFETY: the third page of our own mapping becomes read-only.
    assert_eq!(
        unsafe { libc::mprotect(m.cast::<u8>().add(2 * page).cast(), page, libc::PROT_READ) },
        0
    );
    let e = whole(true)
        .check_writable("out", false)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("out: is read-only"), "{e}");
    // Rows 0 and 1 (pages 0, 1) alone are still writable.
    let first = Tensor3::new(
        "out",
        base,
        0,
        Device::Cpu,
        DType::F32,
        &[2, 256, 4],
        &[1024, 4, 1],
        true,
    )
    .unwrap();
    first.check_writable("out", false).unwrap();
    // SAFETY: reading our own mapping; the probe wrote back what it read.
    let all = unsafe { std::slice::from_raw_parts(base, 4 * page) };
    assert!(all.iter().all(|&b| b == 7));
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(m, 4 * page) };
}
