//! Unit tests of `src/cuda/kernels.rs` that need NVRTC but no GPU: every (dtype, head_dim)
//! the families use compiles, exact and int8 (whose row layout the kernel checks against
//! `src/quant.rs`'s at compile time), and bad head dims are refused with a clear error.

use super::*;

const NAMES: [&str; 7] = [
    "attend_partial_r4",
    "attend_partial_r8",
    "attend_staged_r4",
    "attend_staged_r8",
    "merge_partials",
    "append_kv",
    "gather_kv",
];

/// Whether the kernels' tests can run; panics where NVRTC should be there but is not.
fn nvrtc_present() -> bool {
    // SAFETY: only probes for the library.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return true;
    }
    // `make test-rust` sets HEADINFER_REQUIRE_NVRTC=1 where torch's CUDA wheels ship
    // NVRTC: there a missing library is a broken set-up, not a reason to pass.
    let required = std::env::var("HEADINFER_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "NVRTC did not load, but HEADINFER_REQUIRE_NVRTC=1 (torch's CUDA wheels carry it): \
             is their lib folder on LD_LIBRARY_PATH?"
    );
    eprintln!("skipped: NVRTC (libnvrtc.so) is not on the loader path");
    false
}

#[test]
fn kernels_compile_for_every_dtype_and_head_dim() {
    if !nvrtc_present() {
        return;
    }
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for d in [16, 32, 64, 80, 96, 128, 256] {
            let ptx = compile_ptx(dtype, d, KvFormat::Exact, 9, 0)
                .unwrap_or_else(|e| panic!("{} d={d}: {e}", dtype.name()));
            for name in NAMES {
                assert!(
                    ptx.contains(name),
                    "{name} missing for {} d={d}",
                    dtype.name()
                );
            }
            // The prefill's int8 staging kernel has no exact twin (exact rows are copied).
            assert!(!ptx.contains("dequant_staged"));
        }
    }
}

#[test]
fn int8_kernels_compile_for_every_dtype_and_head_dim() {
    if !nvrtc_present() {
        return;
    }
    // 64, 128, 256: groups of 32 (rows of 72, 136, 272 bytes); 80: groups of 16, padded;
    // 8 (16-bit) and 20 (f32): the smallest groups a vector allows.
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let small = if dtype == DType::F32 { 20 } else { 8 };
        for d in [64, 128, 256, 80, small] {
            let ptx = compile_ptx(dtype, d, KvFormat::Int8, 9, 0)
                .unwrap_or_else(|e| panic!("int8 {} d={d}: {e}", dtype.name()));
            for name in NAMES.iter().chain(&["dequant_staged"]) {
                assert!(
                    ptx.contains(name),
                    "{name} missing for int8 {} d={d}",
                    dtype.name()
                );
            }
            // The quantizer's round-to-nearest-even conversion: this is the int8 variant (the
            // exact one converts no float to an integer).
            assert!(
                ptx.contains("cvt.rni.s32.f32"),
                "int8 {} d={d}",
                dtype.name()
            );
        }
    }
}

#[test]
fn head_dims_the_vector_loads_cannot_cover_are_refused() {
    for kv in [KvFormat::Exact, KvFormat::Int8] {
        let e = compile_ptx(DType::BF16, 60, kv, 9, 0)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("head_dim: 60 is not supported"), "{e}");
        let e = compile_ptx(DType::F32, 0, kv, 9, 0)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("head_dim:"), "{e}");
    }
}
