import os
import shutil
import textwrap

from helpers.corpus import hvdllm
from hvdllm.doctor import loaded_mpi_libraries


def run_doctor(*args, env=None):
    return hvdllm("doctor", *args, env=env)


def test_doctor_sound_with_two_ranks():
    result = run_doctor("--ranks", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sum 3 (expected 3): ok" in result.stdout
    assert "controllers: MPI, Gloo" in result.stdout


def test_doctor_flags_mpi4py_loading_another_mpi(tmp_path):
    """A fake mpi4py that loads a copy of libmpi from elsewhere: the doctor must say so."""
    (real,), _ = loaded_mpi_libraries("import horovod.torch")
    copy = tmp_path / "othermpi" / "libmpi.so.40"
    copy.parent.mkdir()
    shutil.copy(real, copy)
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(textwrap.dedent("""
        import types
        __version__ = "0.0-fake"
        rc = types.SimpleNamespace(initialize=True)
    """))
    (fake / "MPI.py").write_text(textwrap.dedent(f"""
        import ctypes
        _lib = ctypes.CDLL({str(copy)!r}, mode=ctypes.RTLD_GLOBAL)
        def Get_library_version():
            return "Fake MPI from another install"
    """))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'fake'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = run_doctor(env=env)
    assert result.returncode == 1, result.stdout
    fail_lines = [line for line in result.stdout.splitlines() if "FAIL" in line]
    assert len(fail_lines) == 1 and "MPI library" in fail_lines[0]
    assert str(copy) in fail_lines[0] and real in fail_lines[0]
    assert "fix:" in result.stdout


def test_doctor_flags_missing_horovod(tmp_path):
    broken = tmp_path / "horovod"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('simulated broken build')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = run_doctor(env=env)
    assert result.returncode == 1
    assert "horovod.torch does not import" in result.stdout and "make install" in result.stdout
