//! State shared by the signal loop and the connection threads: the main
//! process, and the exec children waiting for the reaper to tell them how
//! their process ended.

use std::collections::HashMap;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use hangar_init_protocol::ExitStatus;

use crate::spawn::{self, Child, ChildSpec};
use crate::users::Credentials;

/// Locks a mutex, ignoring poisoning: a panicking connection thread must not
/// take the whole init down with it, and the data we guard stays consistent
/// across a panic (single inserts and removes).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts the main process; on failure it has recorded why and returns the
/// exit code init must end with.
pub type MainStarter = Box<dyn FnOnce(&Init) -> Result<(), i32> + Send>;

/// Everything the threads of hangar-init share.
pub struct Init {
    /// Pid of the main process; 0 until it is started.
    main_pid: AtomicU32,
    /// How to start the main process, until it is started.
    starter: Mutex<Option<MainStarter>>,
    /// Signals for a main process ordered started but not spawned yet (the
    /// start is answered before the spawn): delivered once it is. Also
    /// guards setting `main_pid`, so that none falls between the two.
    pending_signals: Mutex<Vec<i32>>,
    main_exit: Mutex<Option<ExitStatus>>,
    /// Held for reading while a child is spawned and registered, and for
    /// writing while the reaper calls `waitpid(-1)`.
    ///
    /// This makes "spawn + register" atomic with respect to reaping, so the
    /// reaper can never collect an exec child before its waiter is
    /// registered (no early-exit bookkeeping needed), and any pid it reaps
    /// that has no waiter is an orphan that nobody will ever ask about.
    /// It also protects the spawners: when exec fails, std's
    /// `Command::spawn` reaps the failed child itself with `waitpid(pid)`
    /// (and panics if someone else did).
    spawn_lock: RwLock<()>,
    waiters: Mutex<HashMap<u32, Arc<dyn ExitWatcher>>>,
}

/// Told by the reaper how an exec child ended (on the reaper's thread, so
/// it must only record the status and wake whoever waits).
pub trait ExitWatcher: Send + Sync {
    fn exited(&self, status: ExitStatus);
}

impl Init {
    /// State for an init whose main process `starter` starts, once
    /// [`Init::release_main`] is called.
    pub fn new(starter: MainStarter) -> Self {
        Self {
            main_pid: AtomicU32::new(0),
            starter: Mutex::new(Some(starter)),
            pending_signals: Mutex::new(Vec::new()),
            main_exit: Mutex::new(None),
            spawn_lock: RwLock::new(()),
            waiters: Mutex::new(HashMap::new()),
        }
    }

    /// The main process's pid, once started.
    pub fn main_pid(&self) -> Option<u32> {
        Some(self.main_pid.load(Ordering::SeqCst)).filter(|p| *p != 0)
    }

    /// Starts the main process if it isn't yet. `Err` carries the exit code
    /// init must end with because it could not be started.
    pub fn release_main(&self) -> Result<(), i32> {
        let starter = lock(&self.starter).take();
        match starter {
            Some(start) => start(self),
            None => Ok(()),
        }
    }

    /// Spawns the main process, recording its pid before the reaper can
    /// collect it.
    pub fn spawn_main(&self, cmd: &mut Command) -> io::Result<u32> {
        let _guard = self.spawn_lock.read().unwrap_or_else(PoisonError::into_inner);
        let pid = cmd.spawn()?.id();
        let mut pending = lock(&self.pending_signals);
        self.main_pid.store(pid, Ordering::SeqCst);
        for sig in pending.drain(..) {
            let _ = kill(pid as i32, sig);
        }
        Ok(pid)
    }

    /// Passes `sig` on to the main process: now if it runs, once it does if
    /// it has been ordered started; not at all while it is held.
    pub fn forward(&self, sig: i32) {
        let mut pending = lock(&self.pending_signals);
        match self.main_pid() {
            // It may just have exited (zombie or reaped): a failed kill
            // then is expected and harmless.
            Some(pid) => drop(kill(pid as i32, sig)),
            None if lock(&self.starter).is_none() => pending.push(sig),
            None => {}
        }
    }

    /// How the main process ended, once it has.
    pub fn main_exit(&self) -> Option<ExitStatus> {
        *lock(&self.main_exit)
    }

    /// Spawns `spec`; the reaper tells `watcher` how it ended. Never wait
    /// for the returned child: the reaper owns all waiting.
    pub fn spawn_tracked(&self, spec: &ChildSpec<'_>, watcher: Arc<dyn ExitWatcher>) -> io::Result<Child> {
        let _guard = self.spawn_lock.read().unwrap_or_else(PoisonError::into_inner);
        let child = spawn::spawn(spec)?;
        lock(&self.waiters).insert(child.pid, watcher);
        Ok(child)
    }

    /// Reaps every child that has exited, delivering exec children's statuses
    /// to their waiters. Returns the main process's status if it was among
    /// them.
    pub fn reap(&self) -> Option<ExitStatus> {
        let _guard = self.spawn_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut main = None;
        while let Some((pid, status)) = wait_any(libc::WNOHANG) {
            if Some(pid) == self.main_pid() {
                *lock(&self.main_exit) = Some(status);
                main = Some(status);
            } else if let Some(watcher) = lock(&self.waiters).remove(&pid) {
                watcher.exited(status);
            }
        }
        main
    }

    /// Runs `terminate` and exits with `code`, with spawning stopped for
    /// good: exec requests arriving now block until the process is gone, so
    /// nothing new starts while everything is being killed.
    pub fn shut_down(&self, code: i32, terminate: impl FnOnce()) -> ! {
        let _guard = self.spawn_lock.write().unwrap_or_else(PoisonError::into_inner);
        terminate();
        std::process::exit(code)
    }
}

/// One `waitpid(-1, flags)`; `None` when there is nothing (more) to reap.
pub fn wait_any(flags: libc::c_int) -> Option<(u32, ExitStatus)> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid only writes to the status int we pass.
        let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
        if pid > 0 {
            return Some((pid as u32, decode_wait_status(status)));
        }
        if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None; // 0: children remain but none exited; -1: ECHILD
    }
}

/// Translates a `waitpid` status word.
pub fn decode_wait_status(status: libc::c_int) -> ExitStatus {
    if libc::WIFEXITED(status) {
        ExitStatus::exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ExitStatus::signaled(libc::WTERMSIG(status))
    } else {
        // Without WUNTRACED/WCONTINUED waitpid reports nothing else.
        ExitStatus::exited(255)
    }
}

/// The OOM scores of the processes init starts, so that when a machine
/// runs out of memory (a fork bomb, a leak) the kernel kills what an exec
/// started first, then the main process, and never init before them: init
/// gone, the machine is gone. Scores are raised, not init's lowered: a
/// score below init's needs CAP_SYS_RESOURCE, which a host may not grant
/// even to root. Among processes of one kind the order stays as it was
/// (by size), and on a host short of memory a machine's processes go
/// before the host's own.
#[derive(Debug, Clone, Copy)]
pub enum OomScore {
    /// The main process and what it starts.
    Main,
    /// Exec'd commands and what they start.
    Exec,
}

impl OomScore {
    pub fn value(self) -> &'static std::ffi::CStr {
        match self {
            OomScore::Main => c"500",
            OomScore::Exec => c"1000",
        }
    }
}

/// Makes `cmd` start the way a process expects: an empty signal mask (init
/// blocks everything and the mask is inherited across exec), optionally a
/// new session, the given credentials, and its [`OomScore`]. Dispositions
/// need no work here:
/// exec resets handled signals, init cleared inherited SIG_IGNs at start
/// (see [`reset_inherited_dispositions`]), and std resets SIGPIPE.
pub fn configure_child(cmd: &mut Command, creds: Option<&Credentials>, new_session: bool, oom: OomScore) {
    // Everything the closure needs is allocated here: after fork in a
    // multi-threaded process only async-signal-safe calls are allowed.
    let ids = creds.map(|c| {
        let groups: Vec<libc::gid_t> = c.groups.clone();
        (c.uid, c.gid, groups)
    });
    let setup = move || -> io::Result<()> {
        // SAFETY: only async-signal-safe syscalls on memory owned by the
        // closure; this runs in the forked child before exec.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if new_session && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Before the credentials change, while /proc/self is still
            // root's. Best effort: a kernel without it runs the child anyway.
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                let score = oom.value().to_bytes();
                libc::write(fd, score.as_ptr().cast(), score.len());
                libc::close(fd);
            }
            if let Some((uid, gid, groups)) = &ids {
                // Order matters: groups and gid need privileges that
                // setuid drops.
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    };
    // SAFETY: the closure is async-signal-safe (see above).
    unsafe {
        cmd.pre_exec(setup);
    }
}

/// The kernel's `struct sigaction` on x86_64 and aarch64.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Sets every signal's disposition to the default, except SIGPIPE, which
/// std ignores so that a write to a closed connection fails instead of
/// killing init (std restores it in every child). Called once at start:
/// whatever the runtime left ignored would otherwise survive into every
/// child's exec. Goes straight to the kernel because glibc refuses to touch
/// the two RT signals it reserves (32, 33).
pub fn reset_inherited_dispositions() {
    // 64 is the highest signal number on Linux (NSIG - 1).
    let keep = [libc::SIGKILL, libc::SIGSTOP, libc::SIGPIPE];
    for sig in (1..=64).filter(|s| !keep.contains(s)) {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        {
            let act = KernelSigaction {
                handler: libc::SIG_DFL,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            // SAFETY: `act` is a valid kernel sigaction; the old action is
            // not requested; 8 is the kernel's sigset size.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &act as *const KernelSigaction,
                    0usize,
                    8usize,
                )
            };
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        // SAFETY: resetting to SIG_DFL installs no handler.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
}

/// Sends `sig` to `pid` (a negative pid means a process group).
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
