//! Runs the real `hangar-init` binary as an ordinary (non-PID-1) child with a
//! socket we bind, and talks the protocol to it.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use hangar_init_protocol::{
    ErrorKind, ErrorReply, ExitStatus, FileKind, FileStat, FrameKind, MAX_FRAME, Reply, Request, decode_json,
    read_frame, write_frame, write_json,
};

struct Init {
    child: Child,
    sock: PathBuf,
    exit_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Init {
    fn start(main: &[&str]) -> Self {
        Self::start_with(&[], main)
    }

    fn start_with(flags: &[&str], main: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("init.sock");
        let exit_file = dir.path().join("run/exit.json");
        let listener = UnixListener::bind(&sock).unwrap();
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hangar-init"));
        cmd.args(flags).arg("--exit-file").arg(&exit_file).arg("--").args(main);
        // SAFETY: only dup2/fcntl between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto another fd clears CLOEXEC; if it already is fd 3
                // clear the flag by hand.
                let r = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
            });
        }
        let child = cmd.spawn().unwrap();
        drop(listener);
        Init {
            child,
            sock,
            exit_file,
            dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&self, req: &Request) -> UnixStream {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        write_json(&mut s, FrameKind::Request, req).unwrap();
        s
    }

    fn call(&self, req: &Request) -> Result<Reply, ErrorReply> {
        read_answer(&mut self.send(req))
    }

    fn exec(&self, argv: &[&str], timeout_ms: Option<u64>) -> ExecResult {
        self.exec_with(exec_req(argv, timeout_ms, false), &[])
    }

    fn exec_with(&self, req: Request, stdin: &[&[u8]]) -> ExecResult {
        let mut s = self.send(&req);
        if let Request::Exec { stdin: true, .. } = req {
            // Write stdin concurrently, as a real client must: a command like
            // cat only reads more once its output has been consumed.
            let mut w = s.try_clone().unwrap();
            let chunks: Vec<Vec<u8>> = stdin.iter().map(|c| c.to_vec()).collect();
            thread::spawn(move || {
                for c in chunks {
                    write_frame(&mut w, FrameKind::Stdin, &c).unwrap();
                }
                write_frame(&mut w, FrameKind::StdinEof, &[]).unwrap();
            });
        }
        collect_exec(&mut s)
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "hangar-init did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        // SIGTERM goes to the main process, after which init kills and reaps
        // everything else: no stray processes left behind by the tests.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn exec_req(argv: &[&str], timeout_ms: Option<u64>, stdin: bool) -> Request {
    Request::Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
        cwd: None,
        user: None,
        timeout_ms,
        stdin,
    }
}

fn read_answer(s: &mut UnixStream) -> Result<Reply, ErrorReply> {
    match read_frame(s).unwrap().expect("an answer") {
        (FrameKind::Reply, p) => Ok(decode_json(&p).unwrap()),
        (FrameKind::Error, p) => Err(decode_json(&p).unwrap()),
        (k, _) => panic!("unexpected frame {k:?}"),
    }
}

#[derive(Debug)]
struct ExecResult {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Result<ExitStatus, ErrorReply>,
}

fn collect_exec(s: &mut UnixStream) -> ExecResult {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    loop {
        let (kind, payload) = read_frame(s).unwrap().expect("exec ended without Exit or Error");
        match kind {
            FrameKind::Stdout => stdout.extend(payload),
            FrameKind::Stderr => stderr.extend(payload),
            FrameKind::Exit | FrameKind::Error => {
                let exit = if kind == FrameKind::Exit {
                    Ok(decode_json(&payload).unwrap())
                } else {
                    Err(decode_json(&payload).unwrap())
                };
                return ExecResult { stdout, stderr, exit };
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

#[test]
fn one_connection_serves_requests_in_turn() {
    let init = Init::start(&["sleep", "30"]);
    let mut s = init.send(&exec_req(&["sh", "-c", "echo one"], None, false));
    let first = collect_exec(&mut s);
    assert_eq!(first.stdout, b"one\n");
    write_json(&mut s, FrameKind::Request, &Request::Stat { path: "/".into() }).unwrap();
    assert!(matches!(read_answer(&mut s), Ok(Reply::FileStat(_))));
    write_json(
        &mut s,
        FrameKind::Request,
        &exec_req(&["sh", "-c", "exit 3"], None, false),
    )
    .unwrap();
    assert_eq!(collect_exec(&mut s).exit.unwrap().code, Some(3));
    // An exec that failed to start, or that took stdin, ends the connection.
    write_json(
        &mut s,
        FrameKind::Request,
        &exec_req(&["/no/such/program"], None, false),
    )
    .unwrap();
    assert!(collect_exec(&mut s).exit.is_err());
    assert!(
        read_frame(&mut s).unwrap().is_none(),
        "connection kept after a failed exec"
    );
    let mut s = init.send(&exec_req(&["cat"], None, true));
    write_frame(&mut s, FrameKind::Stdin, b"in").unwrap();
    write_frame(&mut s, FrameKind::StdinEof, &[]).unwrap();
    assert_eq!(collect_exec(&mut s).stdout, b"in");
    assert!(
        read_frame(&mut s).unwrap().is_none(),
        "connection kept after an exec with stdin"
    );
}

fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap()
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

fn gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn exec_output_exit_code_env_cwd() {
    let init = Init::start(&["sleep", "30"]);
    let r = init.exec(&["sh", "-c", "echo out; echo err >&2; exit 3"], None);
    assert_eq!((text(&r.stdout), text(&r.stderr)), ("out\n", "err\n"));
    assert_eq!(r.exit.unwrap(), ExitStatus::exited(3));

    let r = init.exec(&["sh", "-c", "kill -USR1 $$"], None);
    assert_eq!(r.exit.unwrap(), ExitStatus::signaled(libc::SIGUSR1));

    let req = Request::Exec {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo $FOO; pwd; echo ${HOME:-nohome}; trap".into(),
        ],
        env: vec!["FOO=a=b".into()],
        cwd: Some("/tmp".into()),
        user: None,
        timeout_ms: None,
        stdin: false,
    };
    let r = init.exec_with(req, &[]);
    // Only the given environment, and no signal dispositions inherited.
    assert_eq!(text(&r.stdout), "a=b\n/tmp\nnohome\n");
    assert_eq!(r.exit.unwrap().code, Some(0));

    // Children start with an empty signal mask although init blocks all.
    let r = init.exec(&["sh", "-c", "grep -E '^Sig(Blk|Ign)' /proc/self/status"], None);
    assert_eq!(
        text(&r.stdout),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );

    // In its own session: sid == pid.
    let r = init.exec(&["sh", "-c", "echo $$; cut -d' ' -f6 /proc/self/stat"], None);
    let lines: Vec<&str> = text(&r.stdout).lines().collect();
    assert_eq!(lines.len(), 2);
    let (shell_pid, sid): (u32, u32) = (lines[0].parse().unwrap(), lines[1].parse().unwrap());
    assert_eq!(sid, shell_pid);
}

#[test]
fn exec_errors() {
    let init = Init::start(&["sleep", "30"]);
    let e = init.exec(&["no-such-command-xyz"], None).exit.unwrap_err();
    assert_eq!(e.kind, ErrorKind::ExecFailed);
    assert_eq!(e.message, r#"exec "no-such-command-xyz": No such file or directory"#);

    let e = init.exec(&[], None).exit.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);

    let mut req = exec_req(&["true"], None, false);
    if let Request::Exec { cwd, .. } = &mut req {
        *cwd = Some("/no/such/dir".into());
    }
    let e = init.exec_with(req, &[]).exit.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("/no/such/dir"), "{}", e.message);

    let mut req = exec_req(&["true"], None, false);
    if let Request::Exec { user, .. } = &mut req {
        *user = Some("no-such-user-xyz".into());
    }
    assert_eq!(init.exec_with(req, &[]).exit.unwrap_err().kind, ErrorKind::Invalid);
}

#[test]
fn exec_stdin() {
    let init = Init::start(&["sleep", "30"]);
    let r = init.exec_with(exec_req(&["cat"], None, true), &[b"hello ", b"world"]);
    assert_eq!(text(&r.stdout), "hello world");
    assert_eq!(r.exit.unwrap().code, Some(0));

    // More than the pipe buffers hold in both directions.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let chunks: Vec<&[u8]> = big.chunks(100_000).collect();
    let r = init.exec_with(exec_req(&["cat"], None, true), &chunks);
    assert!(r.stdout == big, "cat output differs ({} bytes)", r.stdout.len());

    // Without stdin the child reads /dev/null.
    let r = init.exec(&["cat"], None);
    assert_eq!((r.stdout.len(), r.exit.unwrap().code), (0, Some(0)));

    // The child closing stdin early does not break the exec.
    let r = init.exec_with(exec_req(&["true"], None, true), &[&[0u8; 200_000]]);
    assert_eq!(r.exit.unwrap().code, Some(0));
}

#[test]
fn exec_timeout_kills_group() {
    let init = Init::start(&["sleep", "30"]);
    let started = Instant::now();
    let r = init.exec(&["sh", "-c", "sleep 30 & echo $!; sleep 30"], Some(300));
    let elapsed = started.elapsed();
    assert_eq!(
        r.exit.unwrap(),
        ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: true
        }
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let bg: u32 = text(&r.stdout).trim().parse().unwrap();
    assert!(
        gone(bg, Duration::from_secs(3)),
        "background sleep in the group was killed and reaped"
    );
}

#[test]
fn exec_background_process_does_not_hold_exit() {
    let init = Init::start(&["sleep", "30"]);
    let started = Instant::now();
    let r = init.exec(&["sh", "-c", "sleep 5 & echo $!"], None);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(r.exit.unwrap().code, Some(0));
    // The background process was left running (an agent starting a server
    // this way expects that) and was reparented to init.
    let bg: u32 = text(&r.stdout).trim().parse().unwrap();
    let Reply::Processes { processes } = init.call(&Request::Ps).unwrap() else {
        panic!()
    };
    let p = processes
        .iter()
        .find(|p| p.pid == bg)
        .expect("background sleep still running");
    assert_eq!(p.ppid, init.pid());

    // Orphans are reaped: a short-lived background child leaves no zombie.
    init.exec(&["sh", "-c", "sleep 0.1 &"], None).exit.unwrap();
    thread::sleep(Duration::from_millis(600));
    let Reply::Processes { processes } = init.call(&Request::Ps).unwrap() else {
        panic!()
    };
    let zombies: Vec<_> = processes
        .iter()
        .filter(|p| p.ppid == init.pid() && p.state == "Z")
        .collect();
    assert!(zombies.is_empty(), "{zombies:?}");
}

#[test]
fn client_disconnect_kills_exec() {
    let init = Init::start(&["sleep", "30"]);
    let mut s = init.send(&exec_req(&["sh", "-c", "echo $$; exec sleep 30"], None, false));
    let (kind, payload) = read_frame(&mut s).unwrap().unwrap();
    assert_eq!(kind, FrameKind::Stdout);
    let pid: u32 = text(&payload).trim().parse().unwrap();
    assert!(!gone(pid, Duration::from_millis(200)));
    drop(s);
    assert!(
        gone(pid, Duration::from_secs(3)),
        "exec killed after the client went away"
    );

    // A half-close is not a disconnect: the output still arrives.
    let mut s = init.send(&exec_req(&["sh", "-c", "sleep 0.3; echo late"], None, false));
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let r = collect_exec(&mut s);
    assert_eq!((text(&r.stdout), r.exit.unwrap().code), ("late\n", Some(0)));
}

#[test]
fn exec_as_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let init = Init::start(&["sleep", "30"]);
    let mut req = exec_req(&["sh", "-c", "id -u; id -g; id -G"], None, false);
    if let Request::Exec { user, .. } = &mut req {
        *user = Some("4242:4343".into());
    }
    let r = init.exec_with(req, &[]);
    assert_eq!(text(&r.stdout), "4242\n4343\n4343\n", "stderr: {}", text(&r.stderr));
}

#[test]
fn files() {
    let init = Init::start(&["sleep", "30"]);
    let root = init.dir.path().join("files");
    let file = path(&root.join("sub/blob.bin"));
    let content: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();

    let mut s = init.send(&Request::WriteFile {
        path: file.clone(),
        mode: Some(0o640),
        make_parents: true,
    });
    for c in content.chunks(50_000) {
        write_frame(&mut s, FrameKind::Data, c).unwrap();
    }
    write_frame(&mut s, FrameKind::End, &[]).unwrap();
    let Reply::FileStat(st) = read_answer(&mut s).unwrap() else {
        panic!()
    };
    assert_eq!((st.kind, st.size, st.mode), (FileKind::File, 300_000, 0o640));

    let mut s = init.send(&Request::ReadFile { path: file.clone() });
    let Reply::FileStat(st) = read_answer(&mut s).unwrap() else {
        panic!()
    };
    assert_eq!(st.size, 300_000);
    let mut got = Vec::new();
    loop {
        match read_frame(&mut s).unwrap().unwrap() {
            (FrameKind::Data, p) => {
                assert!(p.len() <= 64 * 1024);
                got.extend(p);
            }
            (FrameKind::End, _) => break,
            (k, _) => panic!("{k:?}"),
        }
    }
    assert!(got == content, "read back {} bytes, different content", got.len());

    // A write the client abandons changes nothing and leaves no temp file.
    let mut s = init.send(&Request::WriteFile {
        path: file.clone(),
        mode: None,
        make_parents: false,
    });
    write_frame(&mut s, FrameKind::Data, b"partial").unwrap();
    drop(s);
    thread::sleep(Duration::from_millis(200));
    assert!(fs::read(&file).unwrap() == content);
    assert_eq!(fs::read_dir(root.join("sub")).unwrap().count(), 1);

    let dir = path(&root.join("d/e"));
    let Reply::FileStat(st) = init
        .call(&Request::Mkdir {
            path: dir.clone(),
            mode: Some(0o700),
            parents: true,
        })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!((st.kind, st.mode), (FileKind::Dir, 0o700));
    let e = init
        .call(&Request::Mkdir {
            path: dir.clone(),
            mode: None,
            parents: false,
        })
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    assert!(e.message.contains(&dir), "{}", e.message);

    std::os::unix::fs::symlink("sub/blob.bin", root.join("link")).unwrap();
    let Reply::FileStat(FileStat { kind, link_target, .. }) = init
        .call(&Request::Stat {
            path: path(&root.join("link")),
        })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (kind, link_target.as_deref()),
        (FileKind::Symlink, Some("sub/blob.bin"))
    );

    let Reply::Listing { entries } = init.call(&Request::List { path: path(&root) }).unwrap() else {
        panic!()
    };
    let names: Vec<_> = entries
        .iter()
        .map(|e| e.path.rsplit('/').next().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["d", "link", "sub"]);

    let e = init
        .call(&Request::Remove {
            path: path(&root.join("d")),
            recursive: false,
        })
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::DirectoryNotEmpty);
    assert_eq!(
        init.call(&Request::Remove {
            path: path(&root.join("link")),
            recursive: false
        }),
        Ok(Reply::Ok)
    );
    assert!(Path::new(&file).exists(), "symlink removed, target kept");
    assert_eq!(
        init.call(&Request::Remove {
            path: path(&root.join("d")),
            recursive: true
        }),
        Ok(Reply::Ok)
    );
    let e = init
        .call(&Request::Stat {
            path: path(&root.join("d")),
        })
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    let e = init
        .call(&Request::Stat {
            path: "relative/path".into(),
        })
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);
}

#[test]
fn bad_requests_do_not_hurt() {
    let init = Init::start(&["sleep", "30"]);
    let mut s = UnixStream::connect(&init.sock).unwrap();
    write_frame(&mut s, FrameKind::Request, b"{\"op\":\"launch_missiles\"}").unwrap();
    assert_eq!(read_answer(&mut s).unwrap_err().kind, ErrorKind::Invalid);
    assert!(read_frame(&mut s).unwrap().is_none());

    let mut s = UnixStream::connect(&init.sock).unwrap();
    write_frame(&mut s, FrameKind::Stdin, b"x").unwrap();
    assert_eq!(read_answer(&mut s).unwrap_err().kind, ErrorKind::Invalid);

    // A header announcing more than MAX_FRAME is refused without reading it.
    let mut s = UnixStream::connect(&init.sock).unwrap();
    s.write_all(&[1]).unwrap();
    s.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes()).unwrap();
    assert_eq!(read_answer(&mut s).unwrap_err().kind, ErrorKind::Invalid);

    let mut s = UnixStream::connect(&init.sock).unwrap();
    s.write_all(&[99, 0, 0, 0, 0]).unwrap();
    assert_eq!(read_answer(&mut s).unwrap_err().kind, ErrorKind::Invalid);

    // A connection that never sends anything does not block others.
    let _idle = UnixStream::connect(&init.sock).unwrap();
    assert!(matches!(init.call(&Request::Status), Ok(Reply::Status { .. })));
}

#[test]
fn ps_and_status() {
    let init = Init::start(&["sleep", "30"]);
    let Reply::Status {
        main_pid: Some(main),
        exited: None,
    } = init.call(&Request::Status).unwrap()
    else {
        panic!()
    };
    let Reply::Processes { processes } = init.call(&Request::Ps).unwrap() else {
        panic!()
    };
    let p = processes.iter().find(|p| p.pid == main).expect("main process listed");
    assert_eq!((p.ppid, p.command.as_str()), (init.pid(), "sleep 30"));
    assert!(processes.windows(2).all(|w| w[0].pid < w[1].pid));
    assert_eq!(
        init.call(&Request::Signal { signal: 99 }).unwrap_err().kind,
        ErrorKind::Invalid
    );
}

#[test]
fn signal_main_process() {
    let mut init = Init::start(&["sleep", "30"]);
    // A long exec that must not survive the machine's end.
    let mut s = init.send(&exec_req(&["sh", "-c", "echo $$; exec sleep 30"], None, false));
    let (_, payload) = read_frame(&mut s).unwrap().unwrap();
    let exec_pid: u32 = text(&payload).trim().parse().unwrap();

    assert_eq!(init.call(&Request::Signal { signal: libc::SIGTERM }), Ok(Reply::Ok));
    let st = init.wait_exit(Duration::from_secs(5));
    assert_eq!(st.code(), Some(143));
    let exit: ExitStatus = serde_json::from_slice(&fs::read(&init.exit_file).unwrap()).unwrap();
    assert_eq!(
        exit,
        ExitStatus {
            code: None,
            signal: Some(15),
            timed_out: false
        }
    );
    assert!(gone(exec_pid, Duration::from_secs(2)), "exec child killed at shutdown");
}

#[test]
fn forwards_signals_sent_to_init() {
    let mut init = Init::start(&["sh", "-c", "trap 'exit 42' USR1; while :; do sleep 0.05; done"]);
    thread::sleep(Duration::from_millis(300));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(init.pid() as i32, libc::SIGUSR1) };
    assert_eq!(init.wait_exit(Duration::from_secs(5)).code(), Some(42));
    let exit: ExitStatus = serde_json::from_slice(&fs::read(&init.exit_file).unwrap()).unwrap();
    assert_eq!(exit, ExitStatus::exited(42));
}

#[test]
fn main_process_exit_and_spawn_failure() {
    let mut init = Init::start(&["sh", "-c", "exit 7"]);
    assert_eq!(init.wait_exit(Duration::from_secs(5)).code(), Some(7));
    assert_eq!(
        fs::read_to_string(&init.exit_file).unwrap(),
        r#"{"code":7,"signal":null,"timed_out":false}"#
    );

    let mut init = Init::start(&["/no/such/program"]);
    assert_eq!(init.wait_exit(Duration::from_secs(5)).code(), Some(127));
    let exit: ExitStatus = serde_json::from_slice(&fs::read(&init.exit_file).unwrap()).unwrap();
    assert_eq!(exit.code, Some(127));

    let mut init = Init::start(&["/dev/null"]);
    assert_eq!(init.wait_exit(Duration::from_secs(5)).code(), Some(126));
}

#[test]
fn held_main_starts_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let script = format!("touch {}; exec sleep 30", marker.display());
    let init = Init::start_with(&["--hold"], &["sh", "-c", &script]);
    // Held: serving, but the main process doesn't exist yet.
    let Reply::Status {
        main_pid: None,
        exited: None,
    } = init.call(&Request::Status).unwrap()
    else {
        panic!("main process started while held")
    };
    assert_eq!(
        init.call(&Request::Signal { signal: 15 }).unwrap_err().kind,
        ErrorKind::Invalid
    );
    assert_eq!(init.exec(&["true"], None).exit.unwrap().code, Some(0));
    assert!(!marker.exists());

    assert_eq!(init.call(&Request::Start).unwrap(), Reply::Ok);
    // A second start is a no-op.
    assert_eq!(init.call(&Request::Start).unwrap(), Reply::Ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "main process never ran");
        thread::sleep(Duration::from_millis(10));
    }
    let Reply::Status { main_pid: Some(_), .. } = init.call(&Request::Status).unwrap() else {
        panic!("main process not recorded")
    };
}

#[test]
fn held_main_that_cannot_start_ends_init_like_at_boot() {
    let mut init = Init::start_with(&["--hold"], &["/no/such/program"]);
    assert_eq!(init.call(&Request::Start).unwrap(), Reply::Ok);
    let status = init.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(127));
    let exit: ExitStatus = serde_json::from_slice(&fs::read(&init.exit_file).unwrap()).unwrap();
    assert_eq!(exit, ExitStatus::exited(127));
}

/// An init that binds its own socket lets go of every host socket for a
/// sandbox checkpoint, waiting for requests in progress, and listens again
/// once told to.
#[test]
fn detach_closes_every_socket_until_attached_again() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/init.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hangar-init"))
        .arg("--listen-path")
        .arg(&sock)
        .arg("--exit-file")
        .arg(dir.path().join("run/exit.json"))
        .args(["--", "sleep", "1000"])
        .spawn()
        .unwrap();
    let connect = || UnixStream::connect(&sock);
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect().is_err() {
        assert!(Instant::now() < deadline, "init never listened");
        thread::sleep(Duration::from_millis(5));
    }
    let call = |req: &Request| {
        let mut s = connect().unwrap();
        write_json(&mut s, FrameKind::Request, req).unwrap();
        (read_answer(&mut s), s)
    };

    // An idle connection holds the detach back until it closes.
    let idle = connect().unwrap();
    let closer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        drop(idle);
    });
    let started = Instant::now();
    let (answer, mut s) = call(&Request::Detach);
    assert_eq!(answer.unwrap(), Reply::Ok);
    assert!(started.elapsed() >= Duration::from_millis(150));
    closer.join().unwrap();
    // Init closes the asking connection too, and listens no more.
    assert_eq!(io::Read::read(&mut s, &mut [0u8; 1]).unwrap(), 0);
    thread::sleep(Duration::from_millis(50));
    assert!(connect().is_err(), "a detached init must not listen");

    fs::write(sock.with_file_name(hangar_init_protocol::ATTACH_FILE), "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(mut s) = connect() {
            write_json(&mut s, FrameKind::Request, &Request::Status).unwrap();
            if matches!(read_answer(&mut s), Ok(Reply::Status { .. })) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "init did not listen again");
        thread::sleep(Duration::from_millis(5));
    }
    assert!(!sock.with_file_name(hangar_init_protocol::ATTACH_FILE).exists());
    // SIGTERM, not SIGKILL: init then takes its main process down with it.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
}

#[test]
fn an_init_handed_its_socket_cannot_detach() {
    let init = Init::start(&["sleep", "1000"]);
    let err = init.call(&Request::Detach).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(matches!(init.call(&Request::Status), Ok(Reply::Status { .. })));
}
