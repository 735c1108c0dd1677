//! Model-based property tests: random sequences of operations — add, update and remove watches
//! and timers from the loop thread, from another thread and from inside callbacks; writes and
//! reads on socketpairs; invoked closures; iterations — run on every backend and on a reference
//! model of the core's semantics (DESIGN.md §2). After every iteration the callbacks that ran
//! (which, in what order, with what events) and the callback states dropped must match.
//!
//! Timers are disabled, every-iteration or periodic (periods of whole minutes). Time moves only
//! where the backend owns the loop's clock: on the scripted backend an `Advance` op moves the
//! script's clock by whole minutes and periodic timers fall due, in deadline order, with missed
//! periods coalesced; the other backends run the same sequences with the clock standing still
//! (a case takes milliseconds, so no period ends), and the model's clock stands still with them.
//!
//! `PROPTEST_CASES` sets the number of cases per backend (64 by default; the release-mode run
//! outside CI uses 10,000: `PROPTEST_CASES=10000 cargo test --release -p vireo-conformance
//! --test model`).

use std::collections::HashMap;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use vireo_conformance::kit::{DropProbe, Fired, Recorder, drain, raw, socketpair, write};
use vireo_core::{Backend, EventLoop, Events, Frequency, LoopHandle, TimerId, WatchId};

/// The model's unit of time. Real time passes too while a case runs (the scripted clock is the
/// monotonic clock plus what the script advanced), but far less than a unit, so a deadline a
/// whole number of units away is due exactly when the model says.
const UNIT: Duration = Duration::from_secs(60);

/// A timer's frequency, as the model writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Disabled,
    Every,
    /// A period of this many [`UNIT`]s.
    Period(u64),
}

impl Kind {
    fn frequency(self) -> Frequency {
        match self {
            Kind::Disabled => Frequency::Disabled,
            Kind::Every => Frequency::EveryIteration,
            Kind::Period(n) => Frequency::Period(UNIT * n as u32),
        }
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Disabled),
        Just(Kind::Every),
        (1..4u64).prop_map(Kind::Period),
    ]
}

// `TimerId` and `WatchId` are the real ids callbacks see; the model numbers them alike.

const PAIRS: usize = 3;

/// What a callback does the next time its watch fires.
#[derive(Debug, Clone)]
enum Action {
    RemoveWatch(usize),
    UpdateWatch(usize, u8),
    AddWatch(usize, u8),
    RemoveTimer(usize),
    UpdateTimer(usize, Kind),
    Invoke(u32),
}

#[derive(Debug, Clone)]
enum Op {
    AddWatch {
        pair: usize,
        interest: u8,
        threaded: bool,
    },
    Update {
        w: usize,
        interest: u8,
        threaded: bool,
    },
    Remove {
        w: usize,
        threaded: bool,
    },
    AddTimer {
        kind: Kind,
        threaded: bool,
    },
    UpdateTimer {
        t: usize,
        kind: Kind,
        threaded: bool,
    },
    RemoveTimer {
        t: usize,
        threaded: bool,
    },
    Write {
        pair: usize,
    },
    Drain {
        pair: usize,
    },
    Invoke {
        mark: u32,
        threaded: bool,
    },
    /// Moves the loop's clock forward by this many units (where the backend has a clock).
    Advance(u64),
    Plan {
        w: usize,
        action: Action,
    },
    Run,
}

fn interest(bits: u8) -> Events {
    let mut e = Events::empty();
    if bits & 1 != 0 {
        e |= Events::READABLE;
    }
    if bits & 2 != 0 {
        e |= Events::WRITABLE;
    }
    e
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        (0..8usize).prop_map(Action::RemoveWatch),
        (0..8usize, 0..4u8).prop_map(|(w, i)| Action::UpdateWatch(w, i)),
        (0..PAIRS, 0..4u8).prop_map(|(p, i)| Action::AddWatch(p, i)),
        (0..4usize).prop_map(Action::RemoveTimer),
        (0..4usize, kind()).prop_map(|(t, k)| Action::UpdateTimer(t, k)),
        (0..1000u32).prop_map(Action::Invoke),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..PAIRS, 0..4u8, any::<bool>())
            .prop_map(|(pair, interest, threaded)| Op::AddWatch { pair, interest, threaded }),
        2 => (0..8usize, 0..4u8, any::<bool>())
            .prop_map(|(w, interest, threaded)| Op::Update { w, interest, threaded }),
        1 => (0..8usize, any::<bool>()).prop_map(|(w, threaded)| Op::Remove { w, threaded }),
        2 => (kind(), any::<bool>()).prop_map(|(kind, threaded)| Op::AddTimer { kind, threaded }),
        1 => (0..4usize, kind(), any::<bool>())
            .prop_map(|(t, kind, threaded)| Op::UpdateTimer { t, kind, threaded }),
        1 => (0..4usize, any::<bool>()).prop_map(|(t, threaded)| Op::RemoveTimer { t, threaded }),
        2 => (0..PAIRS).prop_map(|pair| Op::Write { pair }),
        1 => (0..PAIRS).prop_map(|pair| Op::Drain { pair }),
        1 => (0..1000u32, any::<bool>()).prop_map(|(mark, threaded)| Op::Invoke { mark, threaded }),
        2 => (0..8usize, action()).prop_map(|(w, action)| Op::Plan { w, action }),
        2 => (1..5u64).prop_map(Op::Advance),
        4 => Just(Op::Run),
    ]
}

/// A callback that ran, by plain id (the model cannot make the core's id types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Watch(u64, Events),
    Timer(u64),
    Mark(u32),
}

fn seen(f: &Fired) -> Seen {
    match *f {
        Fired::Watch(id, e) => Seen::Watch(id.as_u64(), e),
        Fired::Timer(id) => Seen::Timer(id.as_u64()),
        Fired::Mark(m) => Seen::Mark(m),
    }
}

/// A timer in the model.
#[derive(Debug, Clone)]
struct MTimer {
    id: u64,
    kind: Kind,
    /// The next deadline of a periodic timer, in units.
    deadline: u64,
    /// When the period was last set, as a count of settings. Deadlines in the same unit are
    /// apart by the real time between their settings (re-arming stays on the grid), so they
    /// fall due in the order they were set.
    set_at: u64,
    alive: bool,
}

/// The reference model.
#[derive(Debug, Default)]
struct Model {
    /// `(id, pair, events, alive)` in creation order.
    watches: Vec<(u64, usize, Events, bool)>,
    timers: Vec<MTimer>,
    /// The clock, in units.
    now: u64,
    /// Timer settings so far (see `MTimer::set_at`).
    settings: u64,
    pending: [usize; PAIRS],
    plans: HashMap<u64, Vec<Action>>,
    invokes: Vec<u32>,
    next_watch: u64,
    next_timer: u64,
    watch_drops: usize,
    timer_drops: usize,
    /// Removed and not yet purged.
    removed_watches: usize,
    removed_timers: usize,
}

impl Model {
    fn add_watch(&mut self, pair: usize, events: Events) -> u64 {
        self.next_watch += 1;
        let id = self.next_watch;
        self.watches.push((id, pair, events, true));
        id
    }

    fn watch_at(&self, w: usize) -> Option<usize> {
        (!self.watches.is_empty()).then(|| w % self.watches.len())
    }

    fn timer_at(&self, t: usize) -> Option<usize> {
        (!self.timers.is_empty()).then(|| t % self.timers.len())
    }

    /// Removes watch `i`; false when it was already removed (the real call fails).
    fn remove_watch(&mut self, i: usize) -> bool {
        let alive = std::mem::replace(&mut self.watches[i].3, false);
        if alive {
            self.removed_watches += 1;
            self.plans.remove(&self.watches[i].0);
        }
        alive
    }

    fn add_timer(&mut self, kind: Kind) -> u64 {
        self.next_timer += 1;
        let id = self.next_timer;
        self.timers.push(MTimer {
            id,
            kind,
            deadline: 0,
            set_at: 0,
            alive: true,
        });
        self.set_timer(self.timers.len() - 1, kind);
        id
    }

    /// A new frequency; a period restarts from now. False when the timer was removed.
    fn set_timer(&mut self, i: usize, kind: Kind) -> bool {
        let now = self.now;
        self.settings += 1;
        let t = &mut self.timers[i];
        if t.alive {
            t.kind = kind;
            if let Kind::Period(p) = kind {
                t.deadline = now + p;
                t.set_at = self.settings;
            }
        }
        t.alive
    }

    fn remove_timer(&mut self, i: usize) -> bool {
        let alive = std::mem::replace(&mut self.timers[i].alive, false);
        if alive {
            self.removed_timers += 1;
        }
        alive
    }

    fn apply(&mut self, a: &Action) {
        match *a {
            Action::RemoveWatch(w) => {
                if let Some(i) = self.watch_at(w) {
                    self.remove_watch(i);
                }
            }
            Action::UpdateWatch(w, bits) => {
                if let Some(i) = self.watch_at(w) {
                    if self.watches[i].3 {
                        self.watches[i].2 = interest(bits);
                    }
                }
            }
            Action::AddWatch(p, bits) => {
                self.add_watch(p, interest(bits));
            }
            Action::RemoveTimer(t) => {
                if let Some(i) = self.timer_at(t) {
                    self.remove_timer(i);
                }
            }
            Action::UpdateTimer(t, kind) => {
                if let Some(i) = self.timer_at(t) {
                    self.set_timer(i, kind);
                }
            }
            Action::Invoke(mark) => self.invokes.push(mark),
        }
    }

    /// One iteration: what fires, in order.
    fn run(&mut self) -> Vec<Seen> {
        // Dropped at the start of the iteration: everything removed before it.
        self.purge();
        let mut union = [Events::empty(); PAIRS];
        for &(_, p, e, alive) in &self.watches {
            if alive {
                union[p] |= e;
            }
        }
        let ready: Vec<Events> = (0..PAIRS)
            .map(|p| {
                let mut r = Events::WRITABLE;
                if self.pending[p] > 0 {
                    r |= Events::READABLE;
                }
                r & union[p]
            })
            .collect();
        let candidates: Vec<u64> = self
            .watches
            .iter()
            .filter(|w| w.3 && !ready[w.1].is_empty())
            .map(|w| w.0)
            .collect();
        // Due timers first: periodic ones whose deadline passed, by deadline (their deadlines
        // are before the iteration's now), then every-iteration ones by id. Timer callbacks
        // here change nothing, so all of them run.
        let now = self.now;
        let mut due: Vec<(u64, u64, u64)> = self
            .timers
            .iter()
            .filter(|t| t.alive && matches!(t.kind, Kind::Period(_)) && t.deadline <= now)
            .map(|t| (t.deadline, t.set_at, t.id))
            .collect();
        due.sort_unstable();
        let mut fired = Vec::new();
        for (_, _, id) in due {
            let t = self.timers.iter_mut().find(|t| t.id == id).unwrap();
            let Kind::Period(p) = t.kind else {
                unreachable!()
            };
            // The next deadline stays on the timer's grid; missed periods coalesce.
            t.deadline += p * ((now - t.deadline) / p + 1);
            fired.push(Seen::Timer(id));
        }
        for t in &self.timers {
            if t.alive && t.kind == Kind::Every {
                fired.push(Seen::Timer(t.id));
            }
        }
        for id in candidates {
            let i = self.watches.iter().position(|w| w.0 == id).unwrap();
            let (_, p, events, alive) = self.watches[i];
            if !alive || events.is_empty() {
                continue;
            }
            let deliver = ready[p] & (events | Events::ERROR | Events::HANGUP);
            if deliver.is_empty() {
                continue;
            }
            fired.push(Seen::Watch(id, deliver));
            for a in self.plans.remove(&id).unwrap_or_default() {
                self.apply(&a);
            }
        }
        for mark in std::mem::take(&mut self.invokes) {
            fired.push(Seen::Mark(mark));
        }
        self.purge();
        fired
    }

    fn purge(&mut self) {
        self.watch_drops += std::mem::take(&mut self.removed_watches);
        self.timer_drops += std::mem::take(&mut self.removed_timers);
    }
}

/// What callbacks share with the test.
#[derive(Clone)]
struct Ctx {
    log: Recorder,
    plans: Arc<Mutex<HashMap<u64, Vec<Action>>>>,
    /// Real ids by creation index, so actions name the same watch and timer as the model.
    watches: Arc<Mutex<Vec<WatchId>>>,
    timers: Arc<Mutex<Vec<TimerId>>>,
    fds: Arc<Vec<RawFd>>,
    watch_probe: DropProbe,
    timer_probe: DropProbe,
}

fn watch_cb(ctx: Ctx) -> impl FnMut(&LoopHandle, WatchId, RawFd, Events) + Send + 'static {
    let tracked = ctx.watch_probe.tracked();
    move |h, id, _, ev| {
        let _keep = &tracked;
        ctx.log.push(Fired::Watch(id, ev));
        let actions = ctx
            .plans
            .lock()
            .unwrap()
            .remove(&id.as_u64())
            .unwrap_or_default();
        for a in actions {
            match a {
                Action::RemoveWatch(w) => {
                    let target = pick(&ctx.watches, w);
                    if let Some(t) = target {
                        let _ = h.remove_handle(t);
                    }
                }
                Action::UpdateWatch(w, bits) => {
                    if let Some(t) = pick(&ctx.watches, w) {
                        let _ = h.update_handle(t, interest(bits));
                    }
                }
                Action::AddWatch(p, bits) => {
                    let new = h
                        .add_handle(ctx.fds[p], interest(bits), watch_cb(ctx.clone()))
                        .expect("add inside a callback");
                    ctx.watches.lock().unwrap().push(new);
                }
                Action::RemoveTimer(t) => {
                    if let Some(t) = pick(&ctx.timers, t) {
                        let _ = h.remove_timeout(t);
                    }
                }
                Action::UpdateTimer(t, kind) => {
                    if let Some(t) = pick(&ctx.timers, t) {
                        let _ = h.update_timeout(t, kind.frequency());
                    }
                }
                Action::Invoke(mark) => {
                    let log = ctx.log.clone();
                    h.invoke(move |_| log.push(Fired::Mark(mark))).unwrap();
                }
            }
        }
    }
}

fn pick<T: Copy>(v: &Mutex<Vec<T>>, i: usize) -> Option<T> {
    let v = v.lock().unwrap();
    (!v.is_empty()).then(|| v[i % v.len()])
}

/// Runs `f` on another thread (and waits for it), or here.
fn on(threaded: bool, f: impl FnOnce() + Send) {
    if threaded {
        std::thread::scope(|s| {
            s.spawn(f);
        });
    } else {
        f();
    }
}

/// Runs `ops` on a loop over `B` and on the model, with the clock standing still.
fn check<B: Backend>(ops: &[Op]) -> Result<(), TestCaseError> {
    let lp = EventLoop::<B>::new().map_err(|e| TestCaseError::fail(e.to_string()))?;
    check_on(lp, None, ops)
}

/// [`check`] on the scripted backend, whose clock the `Advance` ops move.
#[cfg(feature = "scripted")]
fn check_scripted(ops: &[Op]) -> Result<(), TestCaseError> {
    use vireo_backends::scripted::{Script, Scripted};
    let script = Script::new();
    let backend =
        Scripted::with_script(script.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let lp = EventLoop::with_backend(backend).map_err(|e| TestCaseError::fail(e.to_string()))?;
    check_on(lp, Some(&|d| script.advance(d)), ops)
}

/// Runs `ops` on `lp` and on the model. `advance` moves the loop's clock; without it,
/// `Advance` ops are skipped by both.
fn check_on<B: Backend>(
    mut lp: EventLoop<B>,
    advance: Option<&dyn Fn(Duration)>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let h = lp.handle().clone();
    let pairs: Vec<(OwnedFd, OwnedFd)> = (0..PAIRS).map(|_| socketpair()).collect();
    let ctx = Ctx {
        log: Recorder::new(),
        plans: Arc::default(),
        watches: Arc::default(),
        timers: Arc::default(),
        fds: Arc::new(pairs.iter().map(|(a, _)| raw(a)).collect()),
        watch_probe: DropProbe::new(),
        timer_probe: DropProbe::new(),
    };
    let mut model = Model::default();
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::AddWatch {
                pair,
                interest: bits,
                threaded,
            } => {
                let expected = model.add_watch(*pair, interest(*bits));
                let mut got = None;
                on(*threaded, || {
                    got = Some(
                        h.add_handle(ctx.fds[*pair], interest(*bits), watch_cb(ctx.clone()))
                            .unwrap(),
                    );
                });
                let got = got.unwrap();
                prop_assert_eq!(got.as_u64(), expected, "step {}", step);
                ctx.watches.lock().unwrap().push(got);
            }
            Op::Update {
                w,
                interest: bits,
                threaded,
            } => {
                let Some(i) = model.watch_at(*w) else {
                    continue;
                };
                let id = ctx.watches.lock().unwrap()[i];
                let alive = model.watches[i].3;
                if alive {
                    model.watches[i].2 = interest(*bits);
                }
                let mut ok = None;
                on(*threaded, || {
                    ok = Some(h.update_handle(id, interest(*bits)).is_ok())
                });
                prop_assert_eq!(ok, Some(alive), "step {}: update {:?}", step, id);
            }
            Op::Remove { w, threaded } => {
                let Some(i) = model.watch_at(*w) else {
                    continue;
                };
                let id = ctx.watches.lock().unwrap()[i];
                let alive = model.remove_watch(i);
                ctx.plans.lock().unwrap().remove(&id.as_u64());
                let mut ok = None;
                on(*threaded, || ok = Some(h.remove_handle(id).is_ok()));
                prop_assert_eq!(ok, Some(alive), "step {}: remove {:?}", step, id);
            }
            Op::AddTimer { kind, threaded } => {
                let expected = model.add_timer(*kind);
                let tracked = ctx.timer_probe.tracked();
                let log = ctx.log.clone();
                let mut got = None;
                on(*threaded, || {
                    got = Some(
                        h.add_timeout(kind.frequency(), move |_, id| {
                            let _keep = &tracked;
                            log.push(Fired::Timer(id));
                        })
                        .unwrap(),
                    );
                });
                let got = got.unwrap();
                prop_assert_eq!(got.as_u64(), expected, "step {}", step);
                ctx.timers.lock().unwrap().push(got);
            }
            Op::UpdateTimer { t, kind, threaded } => {
                let Some(i) = model.timer_at(*t) else {
                    continue;
                };
                let id = ctx.timers.lock().unwrap()[i];
                let alive = model.set_timer(i, *kind);
                let mut ok = None;
                on(*threaded, || {
                    ok = Some(h.update_timeout(id, kind.frequency()).is_ok())
                });
                prop_assert_eq!(ok, Some(alive), "step {}", step);
            }
            Op::Advance(units) => {
                if let Some(advance) = advance {
                    advance(UNIT * *units as u32);
                    model.now += units;
                }
            }
            Op::RemoveTimer { t, threaded } => {
                let Some(i) = model.timer_at(*t) else {
                    continue;
                };
                let id = ctx.timers.lock().unwrap()[i];
                let alive = model.remove_timer(i);
                let mut ok = None;
                on(*threaded, || ok = Some(h.remove_timeout(id).is_ok()));
                prop_assert_eq!(ok, Some(alive), "step {}", step);
            }
            Op::Write { pair } => {
                write(&pairs[*pair].1, b"x");
                model.pending[*pair] += 1;
            }
            Op::Drain { pair } => {
                drain(raw(&pairs[*pair].0));
                model.pending[*pair] = 0;
            }
            Op::Invoke { mark, threaded } => {
                model.invokes.push(*mark);
                let log = ctx.log.clone();
                let mark = *mark;
                on(*threaded, || {
                    h.invoke(move |_| log.push(Fired::Mark(mark))).unwrap();
                });
            }
            Op::Plan { w, action } => {
                let Some(i) = model.watch_at(*w) else {
                    continue;
                };
                let (id, _, _, alive) = model.watches[i];
                if alive {
                    model.plans.entry(id).or_default().push(action.clone());
                    ctx.plans
                        .lock()
                        .unwrap()
                        .entry(id)
                        .or_default()
                        .push(action.clone());
                }
            }
            Op::Run => {
                let expected = model.run();
                lp.run_once_timeout(Duration::ZERO)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let got: Vec<Seen> = ctx.log.take().iter().map(seen).collect();
                prop_assert_eq!(&got, &expected, "step {}: {}", step, B::NAME);
                prop_assert_eq!(ctx.watch_probe.drops(), model.watch_drops, "step {}", step);
                prop_assert_eq!(ctx.timer_probe.drops(), model.timer_drops, "step {}", step);
            }
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    // PROPTEST_CASES in the environment overrides this default.
    ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

macro_rules! model_test {
    ($name:ident, $feature:literal, $backend:ty) => {
        #[cfg(feature = $feature)]
        proptest! {
            #![proptest_config(config())]
            #[test]
            fn $name(ops in proptest::collection::vec(op(), 1..60)) {
                if !vireo_conformance::available::<$backend>() {
                    return Ok(());
                }
                check::<$backend>(&ops)?;
            }
        }
    };
}

model_test!(poll, "poll", vireo_backends::Poll);
model_test!(epoll, "epoll", vireo_backends::Epoll);
model_test!(io_uring, "io-uring", vireo_backends::IoUring);
model_test!(portable, "portable", vireo_backends::Portable);

#[cfg(feature = "scripted")]
proptest! {
    #![proptest_config(config())]
    #[test]
    fn scripted(ops in proptest::collection::vec(op(), 1..60)) {
        check_scripted(&ops)?;
    }
}

/// Shrunk failures, kept as regression tests on every backend.
mod regressions {
    use super::*;

    /// io_uring reported READABLE for bytes written and read again between two iterations
    /// (its poll completion kept the mask of the wake-up); found by the model test at 2,000
    /// cases.
    fn consumed_between_iterations() -> Vec<Op> {
        vec![
            Op::AddWatch {
                pair: 0,
                interest: 0,
                threaded: false,
            },
            Op::AddWatch {
                pair: 1,
                interest: 1,
                threaded: false,
            },
            Op::Run,
            Op::Write { pair: 1 },
            Op::Drain { pair: 1 },
            Op::AddWatch {
                pair: 0,
                interest: 0,
                threaded: false,
            },
            Op::Run,
        ]
    }

    /// Two periodic timers due in the same iteration fire in deadline order, which is the
    /// order their periods were set, not id order: timer 1's period was set after timer 3's.
    /// (The model first ordered them by id; found at 10,000 cases.)
    fn periods_set_later_fire_later() -> Vec<Op> {
        vec![
            Op::AddTimer {
                kind: Kind::Disabled,
                threaded: false,
            },
            Op::AddTimer {
                kind: Kind::Disabled,
                threaded: false,
            },
            Op::AddTimer {
                kind: Kind::Period(1),
                threaded: false,
            },
            Op::UpdateTimer {
                t: 0,
                kind: Kind::Period(1),
                threaded: false,
            },
            Op::Advance(1),
            Op::Run,
        ]
    }

    fn all() -> [Vec<Op>; 2] {
        [
            consumed_between_iterations(),
            periods_set_later_fire_later(),
        ]
    }

    macro_rules! regression {
        ($name:ident, $feature:literal, $backend:ty) => {
            #[cfg(feature = $feature)]
            #[test]
            fn $name() {
                if vireo_conformance::available::<$backend>() {
                    for ops in all() {
                        check::<$backend>(&ops).unwrap();
                    }
                }
            }
        };
    }

    regression!(poll, "poll", vireo_backends::Poll);
    regression!(epoll, "epoll", vireo_backends::Epoll);
    regression!(io_uring, "io-uring", vireo_backends::IoUring);
    regression!(portable, "portable", vireo_backends::Portable);

    #[cfg(feature = "scripted")]
    #[test]
    fn scripted() {
        for ops in all() {
            check_scripted(&ops).unwrap();
        }
    }
}
