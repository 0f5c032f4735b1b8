//! A VM's control path runs below the scheduler: the vring worker that carries a VM's
//! commands runs at the lowest CPU priority, so a VM registering gigabytes of memory in a loop
//! takes the daemon's CPU only when the scheduler does not need it (bench section
//! `registering`).
//!
//! One test in its own binary, so every `vring_worker` thread in the process is this daemon's.

use vrdma_tests::TestDaemon;

/// The nice value of every thread of this process called `name`.
fn nice_of_threads(name: &str) -> Vec<i64> {
    let mut nice = Vec::new();
    for task in std::fs::read_dir("/proc/self/task")
        .expect("list threads")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).expect("stat");
        nice.push(nice_of(&stat));
    }
    nice
}

/// The nice value in a `/proc/.../stat` line: field 19. The command name (field 2) is in
/// parentheses and may hold spaces, so count from after it.
fn nice_of(stat: &str) -> i64 {
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    after
        .split_whitespace()
        .nth(16)
        .and_then(|f| f.parse().ok())
        .expect("nice field")
}

#[test]
fn the_control_path_runs_at_the_lowest_priority() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    // A command each: each VM's worker has handled an event.
    ca.query_device().expect("query_device on a");
    cb.query_device().expect("query_device on b");
    let workers = nice_of_threads("vring_worker");
    assert_eq!(
        workers.len(),
        2,
        "one vring worker per connected VM: {workers:?}"
    );
    assert!(
        workers.iter().all(|&n| n == 19),
        "vring workers' nice values: {workers:?}"
    );
    // The scheduler keeps the priority of the thread that started the daemon (0, unless the
    // tests themselves run under `nice`).
    let ours = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").expect("stat"));
    assert_eq!(nice_of_threads("vrdma-scheduler"), vec![ours]);
}
