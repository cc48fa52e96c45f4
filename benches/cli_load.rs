//! The CLI on a large cluster dump: `render`, `explain`, `matrix` and `lint` of the 10× model
//! (100,000 pods, 10,000 policies, 1,000 namespaces), read from `kubectl get -o yaml` and
//! `kubectl get -o json` style files, run as the release binary would be by a person.
//!
//! `cargo bench --bench cli_load` writes both dumps to a temporary directory, runs each
//! command three times on each, and prints the median wall time and the peak RSS of the
//! process. Arguments: `--scale 1|10` (default 10), `--commands render,explain,matrix,lint`
//! (default all four).

#[path = "support/synthetic.rs"]
mod synthetic;

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kube-nftpolicy");

fn write_dumps(dir: &Path, scale: &synthetic::Scale) {
    let objects = synthetic::objects_json(scale);
    let json = dir.join("cluster.json");
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let mut f = std::io::BufWriter::new(std::fs::File::create(&json).expect("create json"));
    serde_json::to_writer_pretty(&mut f, &list).expect("write json");
    f.flush().expect("flush");
    let yaml = dir.join("cluster.yaml");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&yaml).expect("create yaml"));
    for o in list["items"].as_array().expect("items") {
        f.write_all(b"---\n").expect("write");
        serde_yaml_ng::to_writer(&mut f, o).expect("write yaml");
    }
    f.flush().expect("flush");
}

/// Wall time, peak RSS (KiB, from `wait4`'s accounting of the child alone), exit code and
/// CPU time (user + system, all threads) of one run. The CPU time is what to compare on a
/// machine shared with other work, where the wall time follows the load.
fn run(args: &[&str]) -> (Duration, u64, i32, Duration) {
    let start = Instant::now();
    let child = Command::new(BIN)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the release binary");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut status = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid out-pointer for one rusage, and `pid` is our own child.
    let rc = unsafe { libc::wait4(pid.as_raw(), &mut status, 0, usage.as_mut_ptr()) };
    let took = start.elapsed();
    assert!(rc > 0, "wait4 failed");
    // SAFETY: wait4 returned successfully, so it filled `usage`.
    let usage = unsafe { usage.assume_init() };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    // Reaped by wait4 above; dropping a `Child` never waits.
    drop(child);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
    (took, usage.ru_maxrss as u64, code, cpu)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scale = match args
        .iter()
        .position(|a| a == "--scale")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        Some("1") => synthetic::TARGET,
        _ => synthetic::TEN_TIMES,
    };
    if let Some(dir) = args
        .iter()
        .position(|a| a == "--write-dumps")
        .and_then(|i| args.get(i + 1))
    {
        write_dumps(Path::new(dir), &scale);
        return;
    }
    // The dumps are written by a child process: a process started from this one inherits its
    // peak RSS in `wait4`'s accounting (the spawn shares the parent's memory until exec), and
    // the generator holds the whole cluster as JSON values.
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let status = Command::new(std::env::current_exe().expect("own path"))
        .args(&args[1..])
        .arg("--write-dumps")
        .arg(dir.path())
        .status()
        .expect("run the dump writer");
    assert!(status.success(), "the dump writer failed");
    let (yaml, json) = (
        dir.path().join("cluster.yaml"),
        dir.path().join("cluster.json"),
    );
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
    println!(
        "cluster: {} pods, {} policies, {} namespaces; cluster.yaml {:.1} MB, cluster.json {:.1} MB (written in {:.1} s)",
        scale.pods,
        scale.policies,
        scale.namespaces,
        size(&yaml),
        size(&json),
        t.elapsed().as_secs_f64()
    );
    for file in [&yaml, &json] {
        let m = file.to_str().expect("utf-8 path");
        let commands: [(&str, Vec<&str>); 4] = [
            (
                "render",
                vec!["render", "--manifests", m, "--node", "node-1"],
            ),
            (
                "explain",
                vec![
                    "explain",
                    "--manifests",
                    m,
                    "--from",
                    "ns-1/pod-1",
                    "--to",
                    "ns-2/pod-2",
                    "--port",
                    "8080",
                ],
            ),
            (
                "matrix",
                vec!["matrix", "--manifests", m, "--namespace", "ns-1"],
            ),
            ("lint", vec!["lint", "--manifests", m]),
        ];
        let wanted: Vec<String> = args
            .iter()
            .position(|a| a == "--commands")
            .and_then(|i| args.get(i + 1))
            .map(|c| c.split(',').map(str::to_owned).collect())
            .unwrap_or_else(|| commands.iter().map(|(n, _)| n.to_string()).collect());
        for (name, argv) in commands
            .into_iter()
            .filter(|(n, _)| wanted.iter().any(|w| w == n))
        {
            let mut runs: Vec<(Duration, u64, i32, Duration)> =
                (0..3).map(|_| run(&argv)).collect();
            runs.sort_by_key(|r| r.0);
            let (median, _, code, _) = runs[1];
            let mut cpu: Vec<Duration> = runs.iter().map(|r| r.3).collect();
            cpu.sort();
            let rss = runs.iter().map(|r| r.1).max().unwrap_or(0);
            println!(
                "{:<8} {:<13} median {:>6.2} s  (min {:.2}, max {:.2})  CPU {:>6.2} s  peak RSS {:>5} MiB  exit {code}",
                name,
                file.file_name().and_then(|n| n.to_str()).unwrap_or(""),
                median.as_secs_f64(),
                runs[0].0.as_secs_f64(),
                runs[2].0.as_secs_f64(),
                cpu[1].as_secs_f64(),
                rss / 1024,
            );
        }
    }
}
