//! Kernel-side cost at the scale targets, measured in a network namespace this benchmark
//! creates (needs root): full sync, partial syncs of typical changes, drop-counter read-back
//! and the drift check, for one node of a 10,000-pod / 1,000-policy cluster (~110 local pods).
//!
//! Run: `cargo bench --bench kernel_sync` (as root). Prints medians and p90 over the runs;
//! figures are recorded in docs/benchmarks.md.

#[path = "support/synthetic.rs"]
mod synthetic;

use std::fs::File;
use std::process::Command;
use std::time::{Duration, Instant};

use kube_nftpolicy::engine::compile::{CompileOptions, compile};
use kube_nftpolicy::engine::resolve::resolve;
use kube_nftpolicy::engine::ruleset::{Ruleset, render};
use kube_nftpolicy::kernel::dataplane::Dataplane;
use kube_nftpolicy::kernel::nft::exec::Nft;
use nix::sched::{CloneFlags, setns};

const NODE: &str = "node-7";
const RUNS: usize = 15;

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<52} median {:>8.2} ms   p90 {:>8.2} ms   min {:>8.2} ms   (n={})",
        ms(v[v.len() / 2]),
        ms(v[v.len() * 9 / 10]),
        ms(v[0]),
        v.len()
    );
}

fn node_ruleset(idx: &kube_nftpolicy::engine::index::Index) -> Ruleset {
    compile(&resolve(&idx.snapshot(), NODE), &CompileOptions::default())
}

/// Sync back and forth between two rulesets; returns the durations (every sync must send a
/// transaction, or the change did not reach this node and the figure would mean nothing).
fn toggle(dp: &mut Dataplane, a: &Ruleset, b: &Ruleset) -> Vec<Duration> {
    (0..RUNS * 2)
        .map(|i| {
            let r = dp
                .sync(if i % 2 == 0 { a } else { b })
                .expect("partial sync");
            assert!(r.kind.is_some(), "the change must reach this node");
            r.duration
        })
        .collect()
}

fn main() {
    // `cargo bench` passes harness flags such as `--bench`; nothing to parse.
    let name = format!("knpbench{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("kernel_sync: cannot create a network namespace (run as root)");
        std::process::exit(1);
    }
    let _ns = Netns(name.clone());
    let fd = File::open(format!("/run/netns/{name}")).expect("open netns");
    setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");

    let s = synthetic::TARGET;
    let base = synthetic::index(&s);
    let rs = node_ruleset(&base);
    println!(
        "{NODE}: {} chains, {} sets, {} set elements",
        rs.chains.len(),
        rs.sets.len(),
        rs.element_count()
    );

    // The floor: `nft -f` loading the rendered script from a file, against our full sync of
    // the same ruleset, interleaved so both see the same machine.
    let script = std::env::temp_dir().join(format!("{name}.nft"));
    std::fs::write(&script, render(&rs, "kernel_sync benchmark")).expect("write script");
    let delete_table = || {
        let _ = Command::new("nft")
            .args([
                "delete",
                "table",
                "inet",
                kube_nftpolicy::engine::ruleset::TABLE,
            ])
            .stderr(std::process::Stdio::null())
            .status();
    };
    let nft_file = || {
        let t = Instant::now();
        let ok = Command::new("nft")
            .arg("-f")
            .arg(&script)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "nft -f {} failed", script.display());
        t.elapsed()
    };
    let (mut file_fresh, mut sync_fresh, mut file_again, mut sync_again) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        delete_table();
        file_fresh.push(nft_file());
        file_again.push(nft_file());
        delete_table();
        let mut dp = Dataplane::new(Nft::default());
        sync_fresh.push(dp.sync(&rs).expect("full sync").duration);
        dp.request_full_sync();
        sync_again.push(dp.sync(&rs).expect("full sync").duration);
    }
    let _ = std::fs::remove_file(&script);
    let ratio = |a: &[Duration], b: &[Duration]| median(a).as_secs_f64() / median(b).as_secs_f64();
    let (r_fresh, r_again) = (
        ratio(&sync_fresh, &file_fresh),
        ratio(&sync_again, &file_again),
    );
    stats("nft -f <rendered script>, table absent", file_fresh);
    stats("full sync, table absent", sync_fresh);
    stats("nft -f <rendered script>, table present", file_again);
    stats("full sync, table present", sync_again);
    println!(
        "full sync / nft -f: {r_fresh:.2} (table absent), {r_again:.2} (table present); target <= 1.2"
    );

    let mut dp = Dataplane::new(Nft::default());
    dp.sync(&rs).expect("full sync");

    // A local pod appears and disappears: map elements, per-pod chains, peer sets.
    let mut with_pod = synthetic::index(&s);
    with_pod.apply_pod(synthetic::pod(7 + 91 * 200, &s, 0)); // a new pod on node-7
    let rs_pod = node_ruleset(&with_pod);
    let partial_pod = toggle(&mut dp, &rs_pod, &rs);
    stats("partial sync: one local pod added/removed", partial_pod);

    // A remote pod changes labels: only peer-set elements move.
    let mut relabelled = synthetic::index(&s);
    for i in 0..20 {
        // Move remote pods out of the `tier` peer sets that every node's egress rules use.
        let mut p = synthetic::pod(1 + i * 91, &s, 0);
        p.labels.insert("tier", "retired");
        relabelled.apply_pod(p);
    }
    let rs_rel = node_ruleset(&relabelled);
    let partial_rel = toggle(&mut dp, &rs_rel, &rs);
    stats("partial sync: 20 remote pods relabelled", partial_rel);

    // A new policy selecting local pods.
    let mut more = synthetic::index(&s);
    // Policy 1007 lands in ns-7 and selects app-0 pods, which node-7 runs.
    more.apply_policy(synthetic::policy(1_007, &s));
    let rs_more = node_ruleset(&more);
    let partial_pol = toggle(&mut dp, &rs_more, &rs);
    stats("partial sync: one policy added/removed", partial_pol);

    let mut counters = Vec::new();
    let mut n = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        n = dp.drop_counters().expect("counters").len();
        counters.push(t.elapsed());
    }
    stats(&format!("read {n} drop counters over netlink"), counters);

    let mut drift = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        assert!(
            dp.check_drift().expect("drift").is_none(),
            "no drift expected"
        );
        drift.push(t.elapsed());
    }
    stats("drift check (netlink read-back)", drift);

    let t = Instant::now();
    let snap = base.snapshot();
    let np = resolve(&snap, NODE);
    let _ = compile(&np, &CompileOptions::default());
    stats("resolve+compile (for scale)", vec![t.elapsed()]);

    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    println!("peak RSS of this process (index of 10,000 pods + rulesets): {rss}");
}
