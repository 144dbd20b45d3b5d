//! Self-checks of the test harness in `tests/it/common/`: the data generators are
//! deterministic and shaped as documented, and the file comparison finds
//! differences hidden between holes of sparse files. (If these fail, every
//! other result is suspect.)

use crate::common::*;

#[test]
fn generators_are_deterministic_and_seed_dependent() {
    assert_eq!(random_bytes(7, 1000), random_bytes(7, 1000));
    assert_ne!(random_bytes(7, 1000), random_bytes(8, 1000));
    assert_eq!(random_bytes(7, 13).len(), 13);
    assert_eq!(
        mixed_bytes(7, 3 * MIB as usize),
        mixed_bytes(7, 3 * MIB as usize)
    );
}

#[test]
fn mixed_bytes_has_zero_runs_text_and_random_data() {
    let data = mixed_bytes(1, (64 * MIB) as usize);
    let zeros = data.len() as u64 - count_nonzero(&data);
    let share = zeros as f64 / data.len() as f64;
    assert!((0.03..0.3).contains(&share), "zero share {share}");
    let text = data.windows(7).filter(|w| w == b"kernel ").count();
    assert!(text > 1000, "text-like segments present");
}

#[test]
fn comparison_finds_a_difference_between_holes() {
    let tmp = tempdir();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let len = 4 * GIB;
    sparse_file(&a, len, &[(GIB, b"same")]);
    sparse_file(&b, len, &[(GIB, b"same"), (3 * GIB + 5, b"x")]);
    assert_eq!(first_difference(&a, &a), None);
    assert_eq!(first_difference(&a, &b), Some(3 * GIB + 5));

    // Written zeros equal a hole.
    let c = tmp.path().join("c");
    sparse_file(&c, len, &[(GIB, b"same"), (2 * GIB, &[0u8; 4096])]);
    assert_eq!(first_difference(&a, &c), None);

    // A length difference is reported at the shorter length.
    let d = tmp.path().join("d");
    sparse_file(&d, len + 1, &[(GIB, b"same")]);
    assert_eq!(first_difference(&a, &d), Some(len));
}

#[test]
fn leftover_check_allows_only_hidden_partial_files() {
    let tmp = tempdir();
    write_file(&tmp.path().join("disk.img"), b"x");
    write_file(&tmp.path().join(".disk.img.vmsync-partial"), b"x");
    assert_no_stray_files(tmp.path(), &["disk.img"]);
    write_file(&tmp.path().join(".disk.img.tmp123"), b"x");
    let r = std::panic::catch_unwind(|| assert_no_stray_files(tmp.path(), &["disk.img"]));
    assert!(r.is_err(), "a hidden non-partial file must be flagged");
}
