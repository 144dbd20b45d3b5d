//! The cycle of `--check --sample K/N` runs, kept in the metrics file.
//!
//! One sampled check compares slice K of N; only the N slices together say
//! that the whole copy is intact, and they run on N different nights. So an
//! alert on "the copy has not been checked completely for too long" needs
//! to know when the last slice of a cycle succeeded, which no single run
//! knows. The file is the memory between runs (it is read, merged and
//! rewritten under a lock by every run anyway), so the cycle's state lives
//! in four families of the check series (`mode="check"`):
//!
//! | family | value |
//! |---|---|
//! | `vmsync_check_sample_slices` | N of the last sampled check |
//! | `vmsync_check_slice_success_timestamp_seconds{slice="K"}` | end of the last run that found slice K identical in this cycle; absent: not yet, or its last check found differences |
//! | `vmsync_check_cycle_started_timestamp_seconds` | the previous completion, or the first sampled check with this N |
//! | `vmsync_check_cycle_completed_timestamp_seconds` | end of the run that found the last missing slice identical; absent until a first full cycle |
//!
//! The rules:
//!
//! * A sampled check with exit 0 records its slice; one with exit 1 (it
//!   found differences) clears it: the slice is not intact now, whatever an
//!   earlier night said. Any other failure (no connection, interrupted)
//!   says nothing about the slice's bytes and leaves it as it was.
//! * When every slice 1..N is recorded, the cycle is complete: completed
//!   and started become this run's end, and the slices are cleared for the
//!   next cycle. Clearing rather than comparing slice times with the last
//!   completion keeps a clock that stepped back from stalling the cycle.
//! * Another N restarts the cycle: slices of the old N cover other bytes.
//!   The last completion stays (the file was checked then); started becomes
//!   this run's end, so the new N gets a full period before an alert.
//! * A check without `--sample` that finds the files identical checked
//!   every byte: it completes the cycle too. Other unsampled checks and all
//!   syncs leave the cycle alone.
//!
//! A file written by an older vmsync has none of these families: the first
//! sampled check then starts a cycle as if N had changed.

use super::families::{
    Key, RunMetrics, Samples, CYCLE_COMPLETED, CYCLE_STARTED, SAMPLE_SLICES, SLICE_SUCCESS,
};
use super::text::{round_ms, seconds};

/// Carries the cycle of `run`'s destination on by one run.
pub(super) fn advance(samples: &mut Samples, run: &RunMetrics) {
    if !run.check {
        return;
    }
    let end = seconds(round_ms(run.end_unix));
    let key = |family| Key::new(family, &run.destination, "check");
    let slice = |k| Key {
        slice: Some(k),
        ..key(SLICE_SUCCESS)
    };
    let Some((k, n)) = run.sample else {
        if run.exit_code == 0 {
            complete(samples, &run.destination, &end);
        }
        return;
    };
    let same_n = samples
        .get(&key(SAMPLE_SLICES))
        .is_some_and(|v| v.parse::<f64>().ok() == Some(f64::from(n)));
    if !same_n {
        clear_slices(samples, &run.destination);
        samples.insert(key(CYCLE_STARTED), end.clone());
    }
    samples.insert(key(SAMPLE_SLICES), n.to_string());
    samples.entry(key(CYCLE_STARTED)).or_insert(end.clone());
    match run.exit_code {
        0 => {
            samples.insert(slice(k), end.clone());
        }
        1 => {
            samples.remove(&slice(k));
        }
        _ => {}
    }
    if (1..=n).all(|s| samples.contains_key(&slice(s))) {
        complete(samples, &run.destination, &end);
    }
}

fn complete(samples: &mut Samples, destination: &str, end: &str) {
    clear_slices(samples, destination);
    for family in [CYCLE_STARTED, CYCLE_COMPLETED] {
        samples.insert(Key::new(family, destination, "check"), end.to_string());
    }
}

fn clear_slices(samples: &mut Samples, destination: &str) {
    samples.retain(|k, _| !(k.family == SLICE_SUCCESS && k.destination == destination));
}

#[cfg(test)]
mod tests {
    use super::super::text::{parse, render};
    use super::*;

    /// A check of `destination` ending at `end`, sampled if `sample` is set.
    fn check(destination: &str, sample: Option<(u32, u32)>, exit_code: u8, end: f64) -> RunMetrics {
        RunMetrics {
            source: "disk.img".into(),
            destination: destination.into(),
            check: true,
            exit_code,
            end_unix: end,
            duration_secs: 1.0,
            source_bytes: 1 << 20,
            wire_bytes: 100,
            literal_bytes: 0,
            reused_bytes: 0,
            differing_bytes: Some(if exit_code == 1 { 4096 } else { 0 }),
            dest_written_bytes: None,
            write_mode: None,
            snapshot: None,
            sample,
        }
    }

    /// Runs `runs` through the same merge a real run uses, reading the
    /// rendered text back between runs as the next run would.
    fn after(runs: &[RunMetrics]) -> Samples {
        let mut samples = Samples::new();
        for r in runs {
            super::super::merge(&mut samples, r);
            samples = parse(&render(&samples)).expect("our own output parses");
        }
        samples
    }

    fn get(samples: &Samples, family: usize, slice: Option<u32>) -> Option<f64> {
        let key = Key {
            slice,
            ..Key::new(family, "d", "check")
        };
        samples.get(&key).map(|v| v.parse().unwrap())
    }

    fn slices(samples: &Samples) -> Vec<(u32, f64)> {
        samples
            .iter()
            .filter(|(k, _)| k.family == SLICE_SUCCESS)
            .map(|(k, v)| (k.slice.unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn slices_in_any_order_complete_the_cycle_at_the_last_missing_one() {
        let s = after(&[
            check("d", Some((3, 3)), 0, 100.0),
            check("d", Some((1, 3)), 0, 200.0),
        ]);
        assert_eq!(get(&s, SAMPLE_SLICES, None), Some(3.0));
        assert_eq!(get(&s, CYCLE_STARTED, None), Some(100.0));
        assert_eq!(get(&s, CYCLE_COMPLETED, None), None, "slice 2 missing");
        assert_eq!(slices(&s), [(1, 200.0), (3, 100.0)]);

        // Slice 1 again (a re-run) changes its time, not the cycle.
        let mut runs = vec![
            check("d", Some((3, 3)), 0, 100.0),
            check("d", Some((1, 3)), 0, 200.0),
            check("d", Some((1, 3)), 0, 250.0),
            check("d", Some((2, 3)), 0, 300.5),
        ];
        let s = after(&runs);
        assert_eq!(get(&s, CYCLE_COMPLETED, None), Some(300.5));
        assert_eq!(get(&s, CYCLE_STARTED, None), Some(300.5));
        assert_eq!(slices(&s), [], "the next cycle starts empty");

        // The next cycle needs all three again.
        runs.push(check("d", Some((1, 3)), 0, 400.0));
        runs.push(check("d", Some((2, 3)), 0, 500.0));
        let s = after(&runs);
        assert_eq!(get(&s, CYCLE_COMPLETED, None), Some(300.5));
        runs.push(check("d", Some((3, 3)), 0, 600.0));
        let s = after(&runs);
        assert_eq!(get(&s, CYCLE_COMPLETED, None), Some(600.0));
    }

    #[test]
    fn differences_clear_the_slice_and_other_failures_keep_it() {
        let s = after(&[
            check("d", Some((1, 2)), 0, 100.0),
            check("d", Some((2, 2)), 4, 200.0),
        ]);
        assert_eq!(slices(&s), [(1, 100.0)], "exit 4 says nothing of slice 2");
        assert_eq!(get(&s, CYCLE_COMPLETED, None), None);

        // Slice 1 found different after it had passed: it is not intact
        // now, so slice 2 passing does not complete the cycle.
        let s = after(&[
            check("d", Some((1, 2)), 0, 100.0),
            check("d", Some((1, 2)), 1, 200.0),
            check("d", Some((2, 2)), 0, 300.0),
        ]);
        assert_eq!(slices(&s), [(2, 300.0)]);
        assert_eq!(get(&s, CYCLE_COMPLETED, None), None);
        assert_eq!(get(&s, CYCLE_STARTED, None), Some(100.0));

        // A failed run of an already recorded slice keeps it.
        let s = after(&[
            check("d", Some((1, 2)), 0, 100.0),
            check("d", Some((1, 2)), 130, 200.0),
            check("d", Some((2, 2)), 0, 300.0),
        ]);
        assert_eq!(get(&s, CYCLE_COMPLETED, None), Some(300.0));
    }

    #[test]
    fn another_n_restarts_the_cycle_and_keeps_the_last_completion() {
        let s = after(&[
            check("d", Some((1, 2)), 0, 100.0),
            check("d", Some((2, 2)), 0, 200.0),
            check("d", Some((1, 2)), 0, 300.0),
            check("d", Some((2, 3)), 0, 400.0),
        ]);
        assert_eq!(get(&s, SAMPLE_SLICES, None), Some(3.0));
        assert_eq!(slices(&s), [(2, 400.0)], "slice 1 of 2 is not slice 1 of 3");
        assert_eq!(get(&s, CYCLE_STARTED, None), Some(400.0));
        assert_eq!(get(&s, CYCLE_COMPLETED, None), Some(200.0));

        // Even a failed first run of the new N restarts it: the clock for
        // the new period runs from the first run that used it.
        let s = after(&[
            check("d", Some((1, 2)), 0, 100.0),
            check("d", Some((1, 5)), 3, 200.0),
        ]);
        assert_eq!(get(&s, SAMPLE_SLICES, None), Some(5.0));
        assert_eq!(slices(&s), []);
        assert_eq!(get(&s, CYCLE_STARTED, None), Some(200.0));
    }

    #[test]
    fn a_full_check_that_passes_completes_the_cycle() {
        let s = after(&[
            check("d", Some((1, 3)), 0, 100.0),
            check("d", None, 1, 200.0),
        ]);
        assert_eq!(
            slices(&s),
            [(1, 100.0)],
            "a failed full check changes nothing"
        );
        assert_eq!(get(&s, CYCLE_COMPLETED, None), None);
        let s = after(&[
            check("d", Some((1, 3)), 0, 100.0),
            check("d", None, 0, 200.0),
        ]);
        assert_eq!(slices(&s), []);
        assert_eq!(get(&s, CYCLE_COMPLETED, None), Some(200.0));
        assert_eq!(get(&s, CYCLE_STARTED, None), Some(200.0));
        assert_eq!(get(&s, SAMPLE_SLICES, None), Some(3.0), "N stays");

        // N = 1: every identical check completes a cycle.
        let s = after(&[check("d", Some((1, 1)), 0, 100.0)]);
        assert_eq!(get(&s, CYCLE_COMPLETED, None), Some(100.0));
    }

    #[test]
    fn syncs_and_other_destinations_leave_the_cycle_alone() {
        let mut sync = check("d", None, 0, 300.0);
        sync.check = false;
        sync.differing_bytes = None;
        let s = after(&[
            check("d", Some((1, 2)), 0, 100.0),
            check("e", Some((2, 2)), 0, 200.0),
            sync,
            check("e", Some((1, 2)), 0, 400.0),
        ]);
        assert_eq!(slices(&s), [(1, 100.0)]);
        assert_eq!(get(&s, CYCLE_STARTED, None), Some(100.0));
        let e = |family| s.get(&Key::new(family, "e", "check")).cloned();
        assert_eq!(e(CYCLE_COMPLETED).as_deref(), Some("400"));
        assert!(s
            .keys()
            .all(|k| k.mode == "check" || k.family < SAMPLE_SLICES));
    }

    #[test]
    fn a_file_of_an_older_vmsync_gets_a_cycle_from_its_first_sampled_check() {
        let old =
            "# HELP vmsync_last_exit_code Exit code of the last vmsync run (see vmsync --help).\n\
                   # TYPE vmsync_last_exit_code gauge\n\
                   vmsync_last_exit_code{destination=\"d\",mode=\"check\"} 0\n\
                   vmsync_last_exit_code{destination=\"d\",mode=\"sync\"} 0\n";
        let mut samples = parse(old).unwrap();
        super::super::merge(&mut samples, &check("d", Some((2, 2)), 0, 100.0));
        assert_eq!(get(&samples, SAMPLE_SLICES, None), Some(2.0));
        assert_eq!(get(&samples, CYCLE_STARTED, None), Some(100.0));
        assert_eq!(slices(&samples), [(2, 100.0)]);
        assert!(samples.contains_key(&Key::new(0, "d", "check")));
        // The text of the slice family, and what is not read back as ours.
        let text = render(&samples);
        assert!(
            text.contains(
                "vmsync_check_slice_success_timestamp_seconds{destination=\"d\",mode=\"check\",slice=\"2\"} 100\n"
            ),
            "{text}"
        );
        for foreign in [
            "vmsync_check_slice_success_timestamp_seconds{destination=\"d\",mode=\"check\"} 1\n",
            "vmsync_check_slice_success_timestamp_seconds{destination=\"d\",mode=\"check\",slice=\"0\"} 1\n",
            "vmsync_check_slice_success_timestamp_seconds{destination=\"d\",mode=\"check\",slice=\"x\"} 1\n",
            "vmsync_check_slice_success_timestamp_seconds{destination=\"d\",mode=\"check\",slice=\"1\",slice=\"2\"} 1\n",
            "vmsync_check_sample_slices{destination=\"d\",mode=\"check\",slice=\"1\"} 1\n",
            "vmsync_check_sample_slices{destination=\"d\",destination=\"e\"} 1\n",
        ] {
            assert_eq!(parse(foreign).map(|s| s.len()), Some(0), "{foreign}");
        }
    }
}
