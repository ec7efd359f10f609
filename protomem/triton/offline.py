"""Compile ``@triton.jit`` kernels for a GPU architecture without a GPU (``triton.compile`` with a
``GPUTarget``), and find the CUDA binaries of the Triton wheel (ptxas, cuobjdump, nvdisasm).

Under ``TRITON_INTERPRET=1`` at import time Triton builds every ``@jit`` function, its own
``tl.sum``/``tl.max`` included, as an interpreter function that the compiler cannot lower; so when
the loaded Triton or a kernel is in interpreter mode the compile runs in a child Python without
the variable (same sys.path, so ``--triton-path`` holds there too), else in this process. Works with
Triton 3.6 and 3.8 (same ``ASTSource(fn, signature, constexprs, attrs)``; constexprs are typed
"constexpr" in the signature). Nothing imports triton at module level."""
import contextlib
import importlib
import importlib.util
import io
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path


class ToolMissing(RuntimeError):
    """A binary the report needs (ptxas, cuobjdump/nvdisasm) is not in the Triton wheel."""


def use_triton_path(path):
    """Put ``path`` (a ``pip install --target`` folder holding another Triton) first on sys.path;
    must run before anything imports triton."""
    if not os.path.isdir(os.path.join(path, "triton")):
        raise FileNotFoundError(f"--triton-path {path}: no triton package there")
    if "triton" in sys.modules:
        loaded = os.path.dirname(os.path.dirname(sys.modules["triton"].__file__))
        if os.path.realpath(loaded) != os.path.realpath(path):
            raise RuntimeError(f"--triton-path {path}: triton was already imported from {loaded}")
        return
    sys.path.insert(0, os.path.abspath(path))


def tool_path(name):
    """Path of a CUDA binary Triton uses: its TRITON_<NAME>_PATH override or the wheel's copy.

    Raises:
        ToolMissing naming the places looked in."""
    import triton

    attr = name.replace("-", "_")
    try:
        return getattr(triton.knobs.nvidia, attr).path
    except (AttributeError, RuntimeError):
        pass
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    raise ToolMissing(f"{name} not found: set TRITON_{attr.upper()}_PATH or use a Triton wheel "
                      f"that ships {bundled}")


def ptxas_path(arch):
    """The ptxas Triton runs for ``arch`` (compute capability x10)."""
    return tool_path("ptxas-blackwell" if arch >= 100 else "ptxas")


def tool_version(path):
    """The CUDA release of a binary ("12.8"), or "?"."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "?"


def disassembler():
    """(command prefix, name) that prints a cubin's SASS: cuobjdump -sass, else nvdisasm -c."""
    for name, flag in (("cuobjdump", "-sass"), ("nvdisasm", "-c")):
        try:
            return [tool_path(name), flag], name
        except ToolMissing:
            pass
    raise ToolMissing("neither cuobjdump nor nvdisasm found in the Triton wheel "
                      "(set TRITON_CUOBJDUMP_PATH)")


def check_tools(arch):
    """Raise ToolMissing unless the ptxas for ``arch`` and a disassembler are present."""
    ptxas_path(arch)
    disassembler()


@contextlib.contextmanager
def compiler_env():
    """Environment of an offline compile, restored afterwards: no interpreter, a fresh compile
    (not a cache hit) so that ptxas runs, and its ``-v`` log printed to stdout."""
    changes = {"TRITON_INTERPRET": None, "TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1"}
    saved = {k: os.environ.get(k) for k in changes}

    def apply(values):
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        apply(changes)
        yield
    finally:
        apply(saved)


def _raw_function(fn):
    """The Python function under a JITFunction / InterpretedFunction / Autotuner / Heuristics."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    if not callable(fn) or not hasattr(fn, "__code__"):
        raise TypeError(f"{fn!r} is not a @triton.jit function")
    return fn


def _jit_function(fn):
    """The JITFunction behind ``fn``, or None if it is an interpreter function."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    return fn if isinstance(fn, JITFunction) else None


def interpreter_loaded():
    """True when Triton was imported with TRITON_INTERPRET set (its own jit functions unusable)."""
    import triton.language as tl

    return _jit_function(tl.standard.sum) is None


def _source(case):
    """ASTSource of a case: every argument typed (constexprs as "constexpr"), pointers 16-byte
    aligned, the case's ``divisible_by_16`` integers too."""
    from triton.compiler import ASTSource

    fn = _jit_function(case.fn)
    unknown = (set(case.signature) | set(case.constexprs)) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{case.name}: {sorted(unknown)} are not arguments of {fn.__name__}")
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in case.constexprs:
            signature[name] = "constexpr"
        elif name in case.signature:
            signature[name] = case.signature[name]
        else:
            raise ValueError(f"{case.name}: argument {name!r} has neither a type nor a constexpr")
        if signature[name].startswith("*") or name in case.divisible_by_16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=dict(case.constexprs), attrs=attrs)


def _plain(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def compile_here(case, arch):
    """Compile one case in this process (Triton must not be in interpreter mode).

    Returns:
        dict: asm (ttgir/ptx text, cubin bytes, ...), metadata (plain values; ``shared`` in
        bytes, ``name``, ``triton_version`` ...), ptxas_log (the ``ptxas -v`` output, may be '')."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = _source(case)
    log = io.StringIO()
    with compiler_env(), contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    meta = {k: _plain(v) for k, v in kernel.metadata._asdict().items()}
    meta.setdefault("triton_version", triton.__version__)
    return dict(asm=dict(kernel.asm), metadata=meta, ptxas_log=log.getvalue())


def _case_request(case):
    raw = _raw_function(case.fn)
    fields = {k: v for k, v in vars(case).items() if k != "fn"}
    return dict(fields, fn_module=raw.__module__, fn_name=raw.__name__,
                fn_file=raw.__code__.co_filename)


def _load_function(req):
    name = req["fn_module"]
    try:
        if name == "__main__":
            raise ModuleNotFoundError(name)
        module = importlib.import_module(name)
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location(f"_offline_{abs(hash(req['fn_file']))}",
                                                      req["fn_file"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return getattr(module, req["fn_name"])


class _Case:
    """A case rebuilt in the child process from its request."""

    def __init__(self, req):
        self.__dict__.update(req)
        self.fn = _load_function(req)


def compile_all(cases, arch=90):
    """Compile every case; in a child process when interpreter mode is involved (module docstring).

    Returns:
        list, one per case: compile_here's dict, or the exception the compile raised."""
    if not interpreter_loaded() and all(_jit_function(c.fn) is not None for c in cases):
        results = []
        for case in cases:
            try:
                results.append(compile_here(case, arch))
            except Exception as e:  # one kernel failing to compile must not hide the others
                results.append(e)
        return results
    with tempfile.TemporaryDirectory() as tmp:
        req, out = os.path.join(tmp, "req.pkl"), os.path.join(tmp, "out.pkl")
        requests = [_case_request(c) for c in cases]
        Path(req).write_bytes(pickle.dumps(dict(arch=arch, cases=requests)))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        code = ("import sys; from protomem.triton.offline import _child; "
                "_child(sys.argv[1], sys.argv[2])")
        done = subprocess.run([sys.executable, "-c", code, req, out], env=env, capture_output=True,
                              text=True)
        if done.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"offline compile process failed ({done.returncode}):\n"
                               f"{done.stderr}")
        return pickle.loads(Path(out).read_bytes())


def _child(req_path, out_path):
    """Entry point of the child process of compile_all."""
    req = pickle.loads(Path(req_path).read_bytes())
    results = []
    for r in req["cases"]:
        try:
            results.append(compile_here(_Case(r), req["arch"]))
        except Exception as e:
            results.append(RuntimeError(f"{type(e).__name__}: {e}"))
    Path(out_path).write_bytes(pickle.dumps(results))
