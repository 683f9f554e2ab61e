"""Ctrl-C (SIGINT): one line and exit 130, never a KeyboardInterrupt traceback (preemption.Interrupts).

Each case runs in a fresh process (a signal and an exit code are the
process's own); the signals are sent at known points, never after a wait.
The first Ctrl-C in training (save at the step reached, rerun resumes) is
in tests/test_resume.py.
"""

import os
import subprocess
import sys
import textwrap

from groupdiff_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)


def run_python(code):
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=300)


def assert_stopped_at_once(result, *phrases):
  assert result.returncode == errors.EXIT_INTERRUPTED, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr and 'KeyboardInterrupt' not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith('Interrupted')]
  assert len(lines) == 1 and 'stopped at once' in lines[0], result.stderr[-3000:]
  for phrase in phrases:
    assert phrase in lines[0], lines[0]
  assert 'not reached' not in result.stdout


def test_a_second_ctrl_c_in_training_stops_at_once():
  result = run_python('''
      import signal
      from groupdiff_jax import preemption
      with preemption.Interrupts() as interrupts, preemption.PreemptionWatch(manager=None) as watch:
        watch.arm_interrupts()  # what the loop does once its step is compiled
        signal.raise_signal(signal.SIGINT)
        print('first:', watch.stop_at(1), interrupts.requested, flush=True)
        signal.raise_signal(signal.SIGINT)
        print('not reached', flush=True)
  ''')
  assert 'first: True True' in result.stdout  # the first one only asks the loop to save and stop
  assert 'Ctrl-C again stops at once' in result.stderr
  assert_stopped_at_once(result, 'the step in flight is not saved')


def test_ctrl_c_while_the_main_thread_is_in_native_code_stops_at_once():
  # In an XLA compile or a blocking device call the main thread runs no bytecode, so Python's own signal handler
  # waits; the thread reading the wakeup fd must act alone. Here the Python-level handler does nothing, as then.
  result = run_python('''
      import os, signal, threading
      from groupdiff_jax import preemption
      preemption.Interrupts._on_handler = lambda self, signum, frame: None
      with preemption.Interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        threading.Event().wait()  # forever, unless the process is ended
        print('not reached', flush=True)
  ''')
  assert_stopped_at_once(result)


def test_ctrl_c_before_the_first_training_step_exits_130_in_one_line(tmp_path):
  # train.signal_at_step=0: SIGINT after the data, model and state are set up, before the first step compiles.
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'groupdiff_jax.main', '--config=configs/digits.py', f'--workdir={workdir}',
             '--config.model.depth=1', '--config.model.hidden_size=32', '--config.model.num_heads=2',
             '--config.train.batch_size=16', '--config.train.signal_at_step=0']
  result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert_stopped_at_once(result)
  assert 'Model SiT-S/4' in result.stderr  # it was set up when the signal came
  assert not os.path.exists(workdir / 'checkpoints') or not os.listdir(workdir / 'checkpoints')


def test_ctrl_c_while_the_entry_point_imports_its_libraries_exits_130_in_one_line(tmp_path):
  # The SIGINT is sent by the entry point's own `import jax` (an import hook), so it lands during imports.
  result = run_python(f'''
      import builtins, os, runpy, signal, sys
      real_import = builtins.__import__
      def import_sending_ctrl_c(name, *args, **kwargs):
        if name == 'jax' and not hasattr(builtins, 'ctrl_c_sent'):
          builtins.ctrl_c_sent = True
          os.kill(os.getpid(), signal.SIGINT)
        return real_import(name, *args, **kwargs)
      builtins.__import__ = import_sending_ctrl_c
      sys.argv = ['main', '--config=configs/digits.py', '--workdir={tmp_path / 'run'}']
      runpy.run_module('groupdiff_jax.main', run_name='__main__', alter_sys=True)
      print('not reached')
      ''')
  assert_stopped_at_once(result, 'while starting up')
  assert not (tmp_path / 'run').exists()
