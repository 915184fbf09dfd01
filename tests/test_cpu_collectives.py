"""XLA's CPU client with several devices per process: the thread reserve scaleattn gives it, the 2-process loop that
deadlocked without it (launch/collective_runahead.py), and the launchers' reading of native stacks and CPU time."""
import os

from launch import collective_runahead, process_pairs
from scaleattn.training import distributed

GDB_EXCERPT = """\
Thread 3 (Thread 0x7f8e867fc6c0 (LWP 3806) "python"):
#0  0x00007f8edf850f58 in absl::Mutex::Block(absl::base_internal::PerThreadSynch*) ()
#1  0x00007f8edb6deb35 in xla::Semaphore::Acquire(long) ()
#2  0x00007f8edb6deb35 in xla::Semaphore::ScopedAcquire(long) ()
#3  0x00007f8edb6deb35 in xla::CpuPjRtRawLoadedExecutable::Execute(xla::ExecuteOptions const&) ()
Thread 2 (Thread 0x7f8e857fa6c0 (LWP 3808) "python"):
#0  0x00007f8ee5678c49 in gloo::transport::tcp::UnboundBuffer::waitRecv(int*) ()
#1  0x00007f8ee56b142e in gloo::allreduce(gloo::AllreduceOptions const&) ()
#2  0x00007f8ee567d31b in xla::cpu::GlooCommunicator::AllReduce(...) ()
#3  0x00007f8ee567d31b in xla::cpu::AllReduceThunk::Execute(xla::cpu::Thunk::ExecuteParams const&) ()
Thread 1 (Thread 0x7f8ee7412b80 (LWP 3748) "python"):
#0  0x00007f8edf853362 in absl::Mutex::AwaitCommon(absl::Condition const&) ()
#1  0x00007f8edb6df7d9 in xla::CommonPjRtLoadedExecutable::Execute(absl::Span<...>) ()
"""


def test_the_reserve_is_twice_the_forced_devices_and_never_overrides(monkeypatch):
  cores = len(os.sched_getaffinity(0))
  monkeypatch.setenv("PJRT_NPROC", "recorded")  # so that monkeypatch restores the variable's state at the end
  monkeypatch.delenv("PJRT_NPROC")
  monkeypatch.delenv("NPROC", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=3")
  distributed.reserve_cpu_client_threads()
  assert os.environ["PJRT_NPROC"] == str(max(cores, 6))
  monkeypatch.setenv("PJRT_NPROC", "5")
  distributed.reserve_cpu_client_threads()
  assert os.environ["PJRT_NPROC"] == "5"
  monkeypatch.delenv("PJRT_NPROC")
  monkeypatch.setenv("NPROC", "64")  # XLA's other variable: a larger reserve is kept
  distributed.reserve_cpu_client_threads()
  assert os.environ["PJRT_NPROC"] == "64"
  monkeypatch.delenv("PJRT_NPROC")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  distributed.reserve_cpu_client_threads()
  assert "PJRT_NPROC" not in os.environ


def test_two_processes_dispatching_far_ahead_finish(monkeypatch, tmp_path):
  """400 pairs of all-reducing programs dispatched without waiting, 2 processes x 4 CPU devices, gloo. With XLA's
  own pool (4 threads on machines of under 4 cores) this deadlocked in every run recorded; on 8 or more cores the
  pool is large enough by itself and the test passes either way."""
  monkeypatch.delenv("PJRT_NPROC", raising=False)
  run = collective_runahead.one_run(None, timeout_s=180, iterations=400, logs=str(tmp_path / "pair"))
  pool = max(len(os.sched_getaffinity(0)), 2 * collective_runahead.DEVICES)
  assert not run["stalled"] and not run["crashed"] and run["exit_codes"] == [0, 0], run
  assert len(run["finished"]) == 2 and all(line.endswith(f"PJRT_NPROC={pool}") for line in run["finished"]), run


def test_native_stack_summary_counts_where_the_deadlock_waits():
  assert process_pairs.native_stack_summary(GDB_EXCERPT) == {
      "threads": 3, "launch_blocked_on_full_queue": 1, "in_all_reduce": 1, "python_thread_in_execute": True}
  idle = GDB_EXCERPT.split("Thread 1 ")[0] + "Thread 1 (LWP 1):\n#0  epoll_wait ()\n"
  assert process_pairs.native_stack_summary(idle)["python_thread_in_execute"] is False


def test_cpu_seconds_from_a_stat_line_whose_name_has_spaces_and_parentheses():
  stat = "1234 (python -m a) b) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 4 0 100 0"
  assert process_pairs.cpu_seconds(stat) == 400 / os.sysconf("SC_CLK_TCK")
