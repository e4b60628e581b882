//! The decision engine: given one intercepted call, which rule (if any)
//! fires, and what the target sees. Pure code: no I/O, no clock, no global
//! RNG. The shim calls it per notification; dry-runs and `--debug` can call
//! it to explain a decision.
//!
//! Rules are tried in order; the first that fires wins. Probabilities of
//! rules on the same call are *shares* of its calls: with
//! `connect=ECONNREFUSED:30%` then `connect=delay:200ms:70%`, 30% of
//! connects are refused and the other 70% delayed, as users read it.
//! Each rule draws from its own RNG, seeded from (seed, rule id), so one
//! rule's draws do not shift when another rule is added.

use rand::{Rng, SeedableRng, rngs::ChaCha8Rng};

use crate::glob::Glob;
use crate::rule::{Action, Rule, RuleError, RuleId, Trigger};
use crate::syscalls::Arch;

/// Path prefixes that a rule without a path glob never faults, so the
/// dynamic linker and the runtime's own `/proc` reads keep working.
pub const SYSTEM_PATH_PREFIXES: &[&str] = &[
    "/lib/",
    "/lib64/",
    "/usr/lib/",
    "/usr/lib64/",
    "/proc/",
    "/sys/",
    "/dev/",
    "/etc/ld.so.",
];

/// Whether `path` is under one of [`SYSTEM_PATH_PREFIXES`].
pub fn is_system_path(path: &str) -> bool {
    SYSTEM_PATH_PREFIXES.iter().any(|p| path.starts_with(p))
}

/// One intercepted call, as the engine sees it.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// Syscall number.
    pub nr: u32,
    /// The path the call touches, when it has one and it could be resolved.
    pub path: Option<&'a str>,
}

/// What the engine decided for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What happens to the call.
    pub action: Action,
    /// Index of the rule that fired, if any.
    pub rule: Option<usize>,
    /// True when a rule would have applied but the path is a system path.
    pub system_path: bool,
}

impl Decision {
    /// The decision text used in events and logs.
    pub fn describe(&self) -> std::borrow::Cow<'static, str> {
        match self.action {
            Action::Allow if self.system_path => "allow (system path)".into(),
            action => action.describe(),
        }
    }

    /// Whether the call was changed (denied or delayed).
    pub fn is_fault(&self) -> bool {
        !matches!(self.action, Action::Allow | Action::Trace)
    }
}

/// What every kind of rule shares once a call or request has matched it:
/// its trigger count, its seeded stream, and how many times it fired.
/// Syscall rules (here) and protocol rules (the proxies) decide with this
/// one type, so `nth=`, `after=` and probabilities mean the same for both.
#[derive(Debug)]
pub struct Odds {
    rng: ChaCha8Rng,
    /// Calls that reached the rule's trigger.
    pub matched: u64,
    /// Calls on which the rule fired.
    pub fired: u64,
}

/// The share of calls the rules considered so far have left: rules on
/// the same call split it in order ("30% refused, delay the rest").
#[derive(Debug, Clone, Copy)]
pub struct Shares(f64);

impl Default for Shares {
    fn default() -> Shares {
        Shares(1.0)
    }
}

impl Odds {
    /// A rule's state, its stream derived from the run's seed and its id.
    pub fn new(seed: u64, id: &str) -> Odds {
        Odds {
            rng: ChaCha8Rng::seed_from_u64(derive_seed(seed, id)),
            matched: 0,
            fired: 0,
        }
    }

    /// Counts a call that matched the rule and says whether the rule
    /// fires on it: the trigger allows this count, and the draw falls in
    /// the rule's share (`probability`, 0..1) of what `shares` has left.
    pub fn consider(&mut self, trigger: Trigger, probability: f64, shares: &mut Shares) -> bool {
        self.matched += 1;
        if !trigger.allows(self.matched) {
            return false;
        }
        let conditional = if shares.0 <= 0.0 {
            0.0
        } else {
            (probability / shares.0).min(1.0)
        };
        shares.0 -= probability;
        if draw(&mut self.rng, conditional) {
            self.fired += 1;
            true
        } else {
            false
        }
    }
}

struct Compiled {
    rule: Rule,
    nrs: Vec<u32>,
    glob: Option<Glob>,
    odds: Odds,
}

impl Compiled {
    fn stats(&self) -> RuleStats {
        RuleStats {
            id: self.rule.id.clone(),
            matched: self.odds.matched,
            fired: self.odds.fired,
        }
    }
}

/// Per-rule counters, for reporting hits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleStats {
    /// The rule's id.
    pub id: RuleId,
    /// Calls that reached the rule's trigger (path and syscall matched).
    pub matched: u64,
    /// Calls on which the rule fired.
    pub fired: u64,
}

/// The rule set of one service, with each rule's trigger count and RNG.
pub struct Engine {
    arch: Arch,
    seed: u64,
    rules: Vec<Compiled>,
    intercepted: Option<Vec<u32>>,
}

impl Engine {
    /// An engine with no rules.
    pub fn new(arch: Arch, seed: u64) -> Engine {
        Engine {
            arch,
            seed,
            rules: Vec::new(),
            intercepted: None,
        }
    }

    /// Declares which syscalls the filter intercepts: from now on a rule
    /// aimed at any other syscall is refused, since it could never fire.
    pub fn restrict_to(&mut self, nrs: Vec<u32>) {
        self.intercepted = Some(nrs);
    }

    /// Replaces the rules. A rule that was already in force (same id, same
    /// content) keeps its counters and RNG, so opening a second fault window
    /// does not restart the `nth=` count of the first; every other rule
    /// starts fresh. Returns the final counters of the rules that are gone.
    pub fn set_rules(&mut self, rules: Vec<Rule>) -> Result<Vec<RuleStats>, RuleError> {
        let mut fresh = Vec::new();
        for rule in &rules {
            if !self.rules.iter().any(|c| &c.rule == rule) {
                fresh.push(self.compile(rule.clone())?);
            }
        }
        let mut previous = std::mem::take(&mut self.rules);
        let mut fresh = fresh.into_iter();
        for rule in rules {
            let next = match previous.iter().position(|c| c.rule == rule) {
                Some(i) => previous.swap_remove(i),
                None => match fresh.next() {
                    Some(c) => c,
                    None => continue,
                },
            };
            self.rules.push(next);
        }
        Ok(previous.iter().map(Compiled::stats).collect())
    }

    fn compile(&self, rule: Rule) -> Result<Compiled, RuleError> {
        {
            let nrs = rule.validate(self.arch)?;
            if let Some(allowed) = &self.intercepted
                && let Some(missing) = nrs.iter().find(|nr| !allowed.contains(nr))
            {
                return Err(RuleError::NotIntercepted {
                    syscall: self.arch.name(*missing).unwrap_or("?").to_string(),
                    rule: rule.id,
                });
            }
            let glob = match &rule.path {
                Some(p) => Some(Glob::new(p).map_err(|source| RuleError::Glob {
                    rule: rule.id.clone(),
                    source,
                })?),
                None => None,
            };
            Ok(Compiled {
                odds: Odds::new(self.seed, &rule.id.to_string()),
                rule,
                nrs,
                glob,
            })
        }
    }

    /// The rules' counters, in rule order.
    pub fn stats(&self) -> Vec<RuleStats> {
        self.rules.iter().map(Compiled::stats).collect()
    }

    /// The rule at `index`.
    pub fn rule(&self, index: usize) -> Option<&Rule> {
        self.rules.get(index).map(|c| &c.rule)
    }

    /// Decides one call and advances the counters and RNGs it touched.
    pub fn decide(&mut self, call: Call<'_>) -> Decision {
        self.decide_with(call, false)
    }

    /// Decides a call a hold rule parked and has now let go: as
    /// [`Engine::decide`], with the hold rules left out, so a fault rule
    /// under the hold still applies.
    pub fn decide_released(&mut self, call: Call<'_>) -> Decision {
        self.decide_with(call, true)
    }

    fn decide_with(&mut self, call: Call<'_>, skip_holds: bool) -> Decision {
        let mut system_path = false;
        let mut shares = Shares::default();
        for (index, c) in self.rules.iter_mut().enumerate() {
            if !c.nrs.contains(&call.nr) || (skip_holds && c.rule.action == Action::Hold) {
                continue;
            }
            // Syscalls without a path never have a glob (Rule::validate
            // refuses one) and arrive with `path: None`, so they always pass.
            match (&c.glob, call.path) {
                (Some(glob), Some(path)) if glob.matches(path) => {}
                // A path-filtered rule never fires on a path it cannot see.
                (Some(_), _) => continue,
                (None, Some(path)) if is_system_path(path) => {
                    system_path = true;
                    continue;
                }
                (None, _) => {}
            }
            if c.odds
                .consider(c.rule.trigger, c.rule.probability, &mut shares)
            {
                return Decision {
                    action: c.rule.action,
                    rule: Some(index),
                    system_path: false,
                };
            }
        }
        Decision {
            action: Action::Allow,
            rule: None,
            system_path,
        }
    }
}

/// True with probability `p`. Certain outcomes consume no randomness, so a
/// 100% rule never shifts the stream of a rule after it.
fn draw(rng: &mut ChaCha8Rng, p: f64) -> bool {
    if p >= 1.0 {
        true
    } else if p <= 0.0 {
        false
    } else {
        // Compare in u64 space: reproducible across rand upgrades, which only
        // promise the raw stream.
        let threshold = (p * 18_446_744_073_709_551_616.0) as u64;
        rng.next_u64() < threshold
    }
}

/// A fresh seed from the kernel's random pool (the clock if that fails).
pub fn random_seed() -> u64 {
    let mut buf = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .is_err()
    {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    }
    u64::from_le_bytes(buf)
}

/// Derives a rule's RNG seed from the run seed and the rule id.
/// A seed for one named stream (a rule, a service, a proxy rule) derived
/// from the run's seed: each stream is independent, and the same run seed
/// replays all of them.
pub fn derive_seed(seed: u64, id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    splitmix64(seed ^ splitmix64(h))
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::parse_fault;

    const X86: Arch = Arch::X86_64;
    const OPENAT: u32 = 257;
    const CONNECT: u32 = 42;
    const WRITE: u32 = 1;

    fn engine(specs: &[&str], seed: u64) -> Engine {
        let rules = specs
            .iter()
            .map(|s| parse_fault(s, X86).expect("valid rule"))
            .collect();
        let mut e = Engine::new(X86, seed);
        e.set_rules(rules).expect("valid rules");
        e
    }

    fn open(e: &mut Engine, path: &str) -> String {
        e.decide(Call {
            nr: OPENAT,
            path: Some(path),
        })
        .describe()
        .into_owned()
    }

    #[test]
    fn deny_openat_under_glob_leaves_other_paths_alone() {
        let mut e = engine(&["openat=ENOENT:100%:/data/*"], 1);
        assert_eq!(open(&mut e, "/data/x"), "deny(no such file or directory)");
        assert_eq!(open(&mut e, "/tmp/x"), "allow");
        assert_eq!(open(&mut e, "/data/sub/x"), "allow");
    }

    #[test]
    fn rule_without_glob_spares_system_paths() {
        let mut e = engine(&["openat=ENOENT:100%"], 1);
        assert_eq!(open(&mut e, "/usr/lib/libc.so.6"), "allow (system path)");
        assert_eq!(open(&mut e, "/etc/ld.so.cache"), "allow (system path)");
        assert_eq!(
            open(&mut e, "/home/app/config"),
            "deny(no such file or directory)"
        );
    }

    #[test]
    fn glob_overrides_the_system_path_exclusion() {
        let mut e = engine(&["openat=EACCES:100%:/proc/**"], 1);
        assert_eq!(open(&mut e, "/proc/self/status"), "deny(permission denied)");
    }

    #[test]
    fn path_filtered_rule_never_fires_on_an_unresolved_path() {
        let mut e = engine(&["openat=ENOENT:100%:/data/*"], 1);
        let d = e.decide(Call {
            nr: OPENAT,
            path: None,
        });
        assert_eq!(d.describe(), "allow");
        assert_eq!(e.stats()[0].matched, 0);
    }

    #[test]
    fn rules_kept_across_set_rules_keep_their_counters() {
        let arch = Arch::native();
        let outer = parse_fault("openat=ENOENT:100%:nth=3", arch).expect("rule");
        let inner = parse_fault("openat=EACCES:0%", arch).expect("rule");
        let mut e = Engine::new(arch, 1);
        e.set_rules(vec![outer.clone()]).expect("rules");
        assert_eq!(open(&mut e, "/a"), "allow");
        // A second window opens: the outer rule must not restart its count.
        e.set_rules(vec![inner.clone(), outer.clone()])
            .expect("rules");
        assert_eq!(open(&mut e, "/a"), "allow");
        assert_eq!(open(&mut e, "/a"), "deny(no such file or directory)");
        let bad = parse_fault("openat=EIO:100%:/x/[", arch);
        assert!(bad.is_err() || e.set_rules(vec![bad.expect("rule")]).is_err());
        assert_eq!(e.stats().len(), 2, "a rejected set leaves the old rules");
    }

    #[test]
    fn nth_fires_only_on_that_call_counted_on_matching_paths() {
        let mut e = engine(&["openat=ENOENT:100%:/data/*:nth=3"], 1);
        let got: Vec<String> = ["/data/1", "/tmp/x", "/data/2", "/data/3", "/data/4"]
            .iter()
            .map(|p| open(&mut e, p))
            .collect();
        assert_eq!(got[0], "allow");
        assert_eq!(got[1], "allow");
        assert_eq!(got[2], "allow");
        assert_eq!(got[3], "deny(no such file or directory)");
        assert_eq!(got[4], "allow");
    }

    #[test]
    fn after_lets_the_first_calls_through() {
        let mut e = engine(&["fsync=EIO:100%:after=2"], 1);
        let fsync = X86.number("fsync").expect("fsync");
        let got: Vec<bool> = (0..4)
            .map(|_| {
                e.decide(Call {
                    nr: fsync,
                    path: Some("/tmp/wal"),
                })
                .is_fault()
            })
            .collect();
        assert_eq!(got, vec![false, false, true, true]);
        assert_eq!(e.stats()[0].fired, 2);
        assert_eq!(e.stats()[0].matched, 4);
    }

    #[test]
    fn zero_percent_rule_intercepts_but_never_fires() {
        let mut e = engine(&["write=EIO:0%"], 1);
        for _ in 0..1000 {
            assert!(
                !e.decide(Call {
                    nr: WRITE,
                    path: Some("/tmp/f")
                })
                .is_fault()
            );
        }
        assert_eq!(e.stats()[0].matched, 1000);
    }

    #[test]
    fn probability_is_roughly_honoured_and_replays_for_a_seed() {
        let run = |seed| {
            let mut e = engine(&["write=EIO:20%"], seed);
            (0..10_000)
                .map(|_| {
                    e.decide(Call {
                        nr: WRITE,
                        path: Some("/tmp/f"),
                    })
                    .is_fault()
                })
                .collect::<Vec<bool>>()
        };
        let a = run(42);
        let fired = a.iter().filter(|f| **f).count();
        assert!((1_800..2_200).contains(&fired), "{fired}");
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
    }

    #[test]
    fn shares_on_one_syscall_split_its_calls() {
        let mut e = engine(&["connect=ECONNREFUSED:30%", "connect=delay:200ms:70%"], 7);
        let (mut refused, mut delayed) = (0, 0);
        for _ in 0..10_000 {
            match e
                .decide(Call {
                    nr: CONNECT,
                    path: None,
                })
                .action
            {
                Action::Deny { .. } => refused += 1,
                Action::Delay { .. } => delayed += 1,
                Action::Allow | Action::Trace | Action::Hold => {}
            }
        }
        assert!((2_700..3_300).contains(&refused), "{refused}");
        assert_eq!(refused + delayed, 10_000);
    }

    #[test]
    fn rules_outside_the_filter_are_refused() {
        let mut e = Engine::new(X86, 1);
        e.restrict_to(vec![OPENAT]);
        assert!(
            e.set_rules(vec![parse_fault("openat=EIO:1%", X86).expect("rule")])
                .is_ok()
        );
        let err = e
            .set_rules(vec![parse_fault("fsync=EIO:1%", X86).expect("rule")])
            .expect_err("fsync is not intercepted");
        assert!(err.to_string().contains("targets fsync"), "{err}");
    }

    #[test]
    fn adding_a_rule_does_not_shift_another_rules_draws() {
        let draws = |specs: &[&str]| {
            let mut e = engine(specs, 9);
            (0..200)
                .map(|_| {
                    e.decide(Call {
                        nr: WRITE,
                        path: Some("/tmp/f"),
                    })
                    .is_fault()
                })
                .collect::<Vec<bool>>()
        };
        let alone = draws(&["write=EIO:50%"]);
        let with_other = draws(&["openat=ENOENT:50%", "write=EIO:50%"]);
        assert_eq!(alone, with_other);
    }
}
