//! The host side of pinned slabs, which needs no GPU: the huge-page mapping.

use super::*;

/// The AnonHugePages (KiB) of the mapping that holds `p`, as /proc/self/smaps says (None:
/// unknown).
fn huge_kib_at(p: usize) -> Option<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= p && p < b;
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                return v.trim().trim_end_matches("kB").trim().parse().ok();
            }
        }
    }
    None
}

#[test]
fn map_huge_gives_aligned_writable_zeroed_memory_of_whole_huge_pages() {
    for len in [1, HUGE_PAGE - 1, HUGE_PAGE, 3 * HUGE_PAGE + 5, 16 << 20] {
        let (p, bytes) = map_huge(len).expect("map_huge");
        assert_eq!(p as usize % HUGE_PAGE, 0, "len {len}: start on a huge page");
        assert!(bytes >= len && bytes % HUGE_PAGE == 0 && bytes - len.max(1) < HUGE_PAGE);
        // SAFETY: `bytes` bytes at `p`, mapped writable by `map_huge`, unmapped below.
        unsafe {
            let s = std::slice::from_raw_parts_mut(p, bytes);
            assert!(s.iter().all(|&b| b == 0), "len {len}: zeroed");
            s[bytes - 1] = 7;
            s[0] = 9;
            assert_eq!((s[0], s[bytes - 1]), (9, 7));
            assert_eq!(
                libc::munmap(p as *mut _, bytes),
                0,
                "len {len}: one mapping"
            );
        }
    }
}

#[test]
fn map_huge_backs_a_slab_with_huge_pages_where_the_kernel_offers_them() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let (p, bytes) = map_huge(16 << 20).expect("map_huge");
    let huge = huge_kib_at(p as usize);
    // SAFETY: the mapping `map_huge` made, unmapped once.
    unsafe { libc::munmap(p as *mut _, bytes) };
    if thp.contains("[never]") || huge.is_none() {
        return; // no huge pages on this kernel, or no smaps to say
    }
    // The kernel may lack free huge pages at the moment; most of a fresh 16 MiB should be.
    assert!(
        huge.unwrap() > 0,
        "no huge pages in a madvised mapping (THP: {thp})"
    );
}
