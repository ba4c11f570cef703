"""A preloaded Python for the documentation tests: `python script.py ARGS` in a snippet is run by a fork of
a process that has already imported torch and the library, instead of a new interpreter (each new one
spends about 1.5 s importing torch on the 2-core machine; the docs run about a dozen such commands).

    python zygote.py SOCKET          # the server: imports, then forks one child per request
    python -S zygote.py --client ... # the client (the `python` that test_docs puts first on PATH)

The client sends its arguments, folder and environment, and its stdin, stdout and stderr as file
descriptors; the child takes them over, runs the script as __main__ and exits with its status, which the
client exits with. Anything other than `python FILE.py ...` (-m, -c, no script) goes to the real interpreter,
and so do the processes that the scripts start themselves (torchrun's workers, --jobs' workers: they use
sys.executable). The server does no computation before it forks, so no thread pool is copied into a child.
"""
import json
import os
import socket
import struct
import sys
import threading


def _run_child(request: dict, fds: list) -> int:
    for i, fd in enumerate(fds):                       # stdin, stdout, stderr of the client
        os.dup2(fd, i)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script, *args = request["argv"]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    import multiprocessing.process
    import runpy
    import traceback
    multiprocessing.process.ORIGINAL_DIR = request["cwd"]   # spawned workers find __main__ from here
    code = 0
    try:
        runpy.run_path(os.path.abspath(script), run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:                              # noqa: BLE001 - reported as the interpreter would
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:                              # noqa: BLE001
            pass
    return code


def _answer(conn: socket.socket, pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    conn.sendall(struct.pack("i", code if code >= 0 else 128 - code))
    conn.close()


def serve(path: str) -> None:
    import importlib
    # the point: imported once, before any fork; torch._dynamo (which the first AdamW step imports, with sympy)
    # and torchvision (the pictures) cost a child about 1.5 s more when they are left to it
    for name in ("torch", "torch._dynamo", "torchvision", "matplotlib.pyplot", "yaml", "vqvae", "vqvae_experiment",
                 "vqvae_grid", "vqvae_analysis"):
        importlib.import_module(name)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path + ".tmp")
    os.rename(path + ".tmp", path)                      # the socket appears when it is ready
    srv.listen(16)
    while True:
        conn, _ = srv.accept()
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(msg)
        if request.get("quit"):
            conn.close()
            break
        pid = os.fork()
        if pid == 0:
            srv.close()
            conn.close()
            os._exit(_run_child(request, fds))
        for fd in fds:
            os.close(fd)
        threading.Thread(target=_answer, args=(conn, pid), daemon=True).start()
    srv.close()


def client(real_python: str, path: str, argv: list) -> None:
    if not argv or argv[0].startswith("-") or not argv[0].endswith(".py"):
        os.execv(real_python, [real_python, *argv])
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    answer = b""
    while len(answer) < 4:
        chunk = conn.recv(4 - len(answer))
        if not chunk:
            sys.exit("zygote: the server closed the connection without an exit status")
        answer += chunk
    sys.exit(struct.unpack("i", answer)[0])


def stop(path: str) -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [json.dumps({"quit": True}).encode()], [])
    conn.close()


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        client(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        serve(sys.argv[1])
