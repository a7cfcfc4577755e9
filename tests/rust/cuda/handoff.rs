//! Unit tests of `src/cuda/handoff.rs` that need no GPU: the worker publishes its word on
//! every path (success, error, panic, a task dropped unrun), and `finish` raises the first
//! failure of the step and then clears it; a task polls its `ready` word (no driver call) and
//! gives up when a draining caller saw the GPU fail.

use super::*;
use std::sync::atomic::AtomicU32;

fn word() -> Box<AtomicU32> {
    Box::new(AtomicU32::new(0))
}

fn publish(w: &AtomicU32, v: u32) -> Publish {
    // SAFETY: each test keeps its word alive until the worker is drained.
    unsafe { Publish::new(w as *const AtomicU32, v) }
}

#[test]
fn every_task_publishes_and_the_first_error_raises_once() {
    let worker = Worker::start().unwrap();
    let words: Vec<Box<AtomicU32>> = (0..4).map(|_| word()).collect();
    worker.submit(Box::new(|| Ok(())), publish(&words[0], 1));
    worker.submit(
        Box::new(|| Err(Error::value("x", "first failure"))),
        publish(&words[1], 2),
    );
    worker.submit(Box::new(|| panic!("boom")), publish(&words[2], 3));
    worker.submit(
        Box::new(|| Err(Error::value("y", "second failure"))),
        publish(&words[3], 4),
    );
    let e = worker.finish().unwrap_err().to_string();
    assert!(e.contains("first failure"), "{e}");
    for (i, w) in words.iter().enumerate() {
        assert_eq!(
            w.load(Ordering::Acquire),
            i as u32 + 1,
            "word {i} not published"
        );
    }
    // Raised once: the next step starts clean.
    assert!(worker.finish().is_ok());
}

#[test]
fn a_panic_is_caught_and_reported() {
    let worker = Worker::start().unwrap();
    let w = word();
    worker.submit(
        Box::new(|| panic!("the worker panicked here")),
        publish(&w, 7),
    );
    let e = worker.finish().unwrap_err();
    assert!(
        matches!(&e, Error::Worker(inner) if matches!(**inner, Error::Panic(_))),
        "{e}"
    );
    assert!(e.to_string().contains("the worker panicked here"), "{e}");
    assert_eq!(w.load(Ordering::Acquire), 7);
}

#[test]
fn a_task_dropped_unrun_still_publishes_and_counts() {
    let worker = Worker::start().unwrap();
    let w = word();
    let job = worker.job(Box::new(|| Ok(())), Some(publish(&w, 9)));
    drop(job);
    assert_eq!(w.load(Ordering::Acquire), 9);
    let e = worker.finish().unwrap_err().to_string();
    assert!(e.contains("stopped before running"), "{e}");
}

#[test]
fn drain_waits_for_slow_tasks_and_run_here_is_synchronous() {
    let worker = Worker::start().unwrap();
    let w = word();
    let done = Arc::new(AtomicU32::new(0));
    let d = done.clone();
    worker.submit(
        Box::new(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            d.store(1, Ordering::SeqCst);
            Ok(())
        }),
        publish(&w, 1),
    );
    worker.drain();
    assert_eq!(done.load(Ordering::SeqCst), 1);
    assert_eq!(w.load(Ordering::Acquire), 1);
    worker.run_here(Box::new(|| Err(Error::value("z", "inline failure"))));
    assert!(worker
        .finish()
        .unwrap_err()
        .to_string()
        .contains("inline failure"));
}

#[test]
fn dropping_the_worker_runs_what_was_queued() {
    let w = word();
    {
        let worker = Worker::start().unwrap();
        worker.submit(
            Box::new(|| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                Ok(())
            }),
            publish(&w, 5),
        );
    }
    assert_eq!(w.load(Ordering::Acquire), 5);
}

#[test]
fn a_task_polls_its_ready_word_without_the_driver() {
    // The GPU's write of `ready` stands in as another thread's store.
    let (ready, done) = (Arc::new(AtomicU32::new(0)), word());
    let worker = Worker::start().unwrap();
    let polled = ReadyWord {
        word: Arc::as_ptr(&ready),
        seq: 3,
        abort: Arc::default(),
    };
    let ran = Arc::new(AtomicBool::new(false));
    let seen = ran.clone();
    worker.submit(
        Box::new(move || {
            polled.wait()?;
            seen.store(true, Ordering::Release);
            Ok(())
        }),
        publish(&done, 3),
    );
    std::thread::sleep(Duration::from_millis(30));
    assert!(
        !ran.load(Ordering::Acquire),
        "ran before its query was ready"
    );
    assert_eq!(done.load(Ordering::Acquire), 0);
    ready.store(3, Ordering::Release);
    worker.finish().unwrap();
    assert!(ran.load(Ordering::Acquire));
    assert_eq!(done.load(Ordering::Acquire), 3);
}

#[test]
fn a_draining_caller_that_sees_the_gpu_fail_stops_the_poll() {
    let (ready, done) = (Arc::new(AtomicU32::new(0)), word());
    let abort = Arc::new(AtomicBool::new(false));
    let worker = Worker::start().unwrap();
    let polled = ReadyWord {
        word: Arc::as_ptr(&ready),
        seq: 1,
        abort: abort.clone(),
    };
    worker.submit(Box::new(move || polled.wait()), publish(&done, 1));
    let mut checks = 0;
    worker.drain_checking(|| {
        checks += 1;
        if checks == 2 {
            abort.store(true, Ordering::Relaxed);
        }
    });
    assert!(checks >= 2);
    // The stream waiting on `done` is released, and the step raises.
    assert_eq!(done.load(Ordering::Acquire), 1);
    let err = worker.finish().unwrap_err().to_string();
    assert!(err.contains("query reached the host"), "{err}");
}
