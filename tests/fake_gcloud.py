"""A recording stand-in for `gcloud`, for testing launch/tpu_pod.sh's control flow only.

It never talks to Google Cloud and checks nothing about the real gcloud's
flags: it appends each call's arguments (one JSON list a line) to
$FAKE_GCLOUD_DIR/calls and plays back what the test queued:
  states  one queued-resource state a line (WAITING, ACTIVE, SUSPENDED,
          MISSING = describe fails); each `queued-resources describe` takes
          the first line, the last one repeats.
  runs    one exit code a line for each training run (an `ssh --command`
          that runs groupdiff_jax.main); 255 is what ssh returns when the
          VM went away.
Every other call (create, delete, scp, the install ssh) succeeds.
"""

import json
import os
import sys


def _pop(path, repeat_last):
  with open(path) as f:
    lines = [line.strip() for line in f if line.strip()]
  if not lines:
    raise SystemExit(f'fake gcloud: nothing queued in {path}')
  if len(lines) > 1 or not repeat_last:
    with open(path, 'w') as f:
      f.write(''.join(line + '\n' for line in lines[1:]))
  return lines[0]


def main(argv):
  directory = os.environ['FAKE_GCLOUD_DIR']
  with open(os.path.join(directory, 'calls'), 'a') as f:
    f.write(json.dumps(argv) + '\n')
  if argv[:3] == ['compute', 'tpus', 'queued-resources'] and argv[3] == 'describe':
    state = _pop(os.path.join(directory, 'states'), repeat_last=True)
    if state == 'MISSING':
      print('ERROR: NOT_FOUND', file=sys.stderr)
      return 1
    print(state)
    return 0
  if argv[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh'] and any('groupdiff_jax.main' in a for a in argv):
    return int(_pop(os.path.join(directory, 'runs'), repeat_last=False))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
