//! What the backend asks of the device, counted while profiling is on (`pretrain --profile`):
//! kernel launches by kernel, GEMMs by shape, memsets and copies by direction with their bytes,
//! and host synchronisations by the call site that caused them (blocking downloads carry
//! `#[track_caller]` up to the model, optimizer or trainer line that asked). Counts go to the
//! range the trainer last named (`train step`, `evaluation`, `checkpoint`, `other`), so a step's
//! work is told apart from the saves and evaluations between steps. The same counts on a GPU and
//! on the emulated device, which runs the same stream.
use crate::backend::PROFILE_TRAIN_STEP as TRAIN_STEP;
use std::collections::BTreeMap;
use std::panic::Location;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Counts since profiling started (see [`Profile::since`] for a window).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    /// Times the range was entered (for `train step`: the optimizer steps counted).
    pub entered: u64,
    /// Launches per kernel entry point.
    pub launches: BTreeMap<String, u64>,
    /// GEMMs per `m×n×k` (column-major, with their transposes and element types).
    pub gemms: BTreeMap<String, u64>,
    /// Per kind (`memset`, `H2D`, `D2H`, `D2D`): (operations, bytes).
    pub transfers: BTreeMap<&'static str, (u64, u64)>,
    /// Host synchronisations per `file:line (what)`.
    pub syncs: BTreeMap<String, u64>,
}

impl Profile {
    pub fn total_launches(&self) -> u64 {
        self.launches.values().sum()
    }
    pub fn total_gemms(&self) -> u64 {
        self.gemms.values().sum()
    }
    pub fn total_syncs(&self) -> u64 {
        self.syncs.values().sum()
    }

    /// What happened after `earlier` (a snapshot of the same profile).
    pub fn since(&self, earlier: &Profile) -> Profile {
        fn minus<K: Ord + Clone>(now: &BTreeMap<K, u64>, then: &BTreeMap<K, u64>) -> BTreeMap<K, u64> {
            now.iter()
                .map(|(k, v)| (k.clone(), v - then.get(k).copied().unwrap_or(0)))
                .filter(|(_, v)| *v > 0)
                .collect()
        }
        let transfers = self
            .transfers
            .iter()
            .map(|(k, (n, b))| {
                let (n0, b0) = earlier.transfers.get(k).copied().unwrap_or((0, 0));
                (*k, (n - n0, b - b0))
            })
            .filter(|(_, (n, _))| *n > 0)
            .collect();
        Profile {
            entered: self.entered - earlier.entered,
            launches: minus(&self.launches, &earlier.launches),
            gemms: minus(&self.gemms, &earlier.gemms),
            transfers,
            syncs: minus(&self.syncs, &earlier.syncs),
        }
    }

    /// A readable table, every count divided by `per` (e.g. the optimizer steps the window holds).
    pub fn table(&self, per: u64) -> String {
        let per = per.max(1) as f64;
        let mut s = format!(
            "| per step (mean of {per}) | count |\n|---|---:|\n| kernel launches | {:.1} |\n| GEMMs | {:.1} |\n| host syncs | {:.1} |\n",
            self.total_launches() as f64 / per,
            self.total_gemms() as f64 / per,
            self.total_syncs() as f64 / per
        );
        for (kind, (n, bytes)) in &self.transfers {
            s.push_str(&format!("| {kind} | {:.1} ({:.1} MiB) |\n", *n as f64 / per, *bytes as f64 / per / 1048576.0));
        }
        let mut section = |title: &str, rows: &BTreeMap<String, u64>| {
            let mut rows: Vec<(&String, &u64)> = rows.iter().collect();
            rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            s.push_str(&format!("\n| {title} | per step |\n|---|---:|\n"));
            for (k, v) in rows {
                s.push_str(&format!("| {k} | {:.1} |\n", *v as f64 / per));
            }
        };
        section("host sync at", &self.syncs);
        section("kernel", &self.launches);
        section("GEMM (m×n×k)", &self.gemms);
        s
    }
}

/// The profile of a run by range, and the whole as the report prints it: the `train step`
/// range per step, every other range as a one-line total.
pub fn report(ranges: &BTreeMap<&'static str, Profile>) -> String {
    let mut s = String::new();
    for (name, p) in ranges.iter().filter(|(name, _)| **name != TRAIN_STEP) {
        let bytes: u64 = p.transfers.values().map(|(_, b)| b).sum();
        s.push_str(&format!(
            "{name} (all {} times together): {} launches, {} GEMMs, {} host syncs, {:.1} MiB copied or set\n",
            p.entered,
            p.total_launches(),
            p.total_gemms(),
            p.total_syncs(),
            bytes as f64 / 1048576.0
        ));
    }
    match ranges.get(TRAIN_STEP) {
        Some(p) => s.push_str(&format!("\n{TRAIN_STEP}:\n{}", p.table(p.entered))),
        None => s.push_str("no train step was counted\n"),
    }
    s
}

/// The counters a device keeps: nothing is counted (one relaxed load) unless profiling is on.
pub(crate) struct Profiler {
    on: AtomicBool,
    counts: Mutex<(&'static str, BTreeMap<&'static str, Profile>)>,
}

impl Default for Profiler {
    fn default() -> Self {
        Profiler { on: AtomicBool::new(false), counts: Mutex::new(("other", BTreeMap::new())) }
    }
}

impl Profiler {
    pub(crate) fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// Counts from now on go to range `name`.
    pub(crate) fn enter(&self, name: &'static str) {
        let mut c = self.counts.lock().unwrap();
        c.0 = name;
        if self.on.load(Ordering::Relaxed) {
            c.1.entry(name).or_default().entered += 1;
        }
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<&'static str, Profile> {
        self.counts.lock().unwrap().1.clone()
    }

    fn with(&self, f: impl FnOnce(&mut Profile)) {
        if self.on.load(Ordering::Relaxed) {
            let mut c = self.counts.lock().unwrap();
            let range = c.0;
            f(c.1.entry(range).or_default());
        }
    }

    pub(crate) fn launch(&self, kernel: &str) {
        self.with(|p| *p.launches.entry(kernel.to_string()).or_default() += 1);
    }

    pub(crate) fn gemm(&self, shape: impl FnOnce() -> String) {
        self.with(|p| *p.gemms.entry(shape()).or_default() += 1);
    }

    /// `kind`: `memset`, `H2D`, `D2H` or `D2D`.
    pub(crate) fn transfer(&self, kind: &'static str, bytes: usize) {
        self.with(|p| {
            let e = p.transfers.entry(kind).or_default();
            e.0 += 1;
            e.1 += bytes as u64;
        });
    }

    pub(crate) fn sync(&self, site: &Location<'_>, what: &str) {
        self.with(|p| *p.syncs.entry(format!("{}:{} ({what})", site.file(), site.line())).or_default() += 1);
    }
}
