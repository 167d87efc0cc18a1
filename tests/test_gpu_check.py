"""`make gpu-check` (perf/gpu_check.py, docs/gpu.md) proven on the CPU: the C++ runner's CMake gets the CUDA
toolkit's real root."""
import os


def test_the_runner_cmake_gets_the_toolkit_root_behind_an_nvcc_wrapper_and_the_wheels_nvrtc(tmp_path, monkeypatch):
    """An nvcc wrapper script in a bin/ of its own (as /usr/local/bin/nvcc -> a toolkit assembled from
    wheels) makes CMake's FindCUDA take that bin's parent for the toolkit root; the root is where nvcc
    says it lives. A toolkit without libnvrtc gets the torch wheel's."""
    from dllm.apps.export import build
    root = tmp_path.resolve() / "cuda-13.0"
    for d in ("include", "bin", "lib"):
        (root / d).mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ TOP={root}/bin/.." >&2\n')
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    for f in (nvcc, wrapper):
        f.chmod(0o755)
    lib = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    for name in ("libnvrtc-builtins.so.13", "libnvrtc.so.13"):
        (lib / name).write_text("")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    assert build.cuda_root() == root
    nvrtc = lib / "libnvrtc.so.13"
    assert build.cuda_cmake_flags(tmp_path / "site") == [
        f"-DCUDA_TOOLKIT_ROOT_DIR={root}", f"-DCUDAToolkit_ROOT={root}", f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-DCUDA_nvrtc_LIBRARY={nvrtc}", f"-DCUDA_NVRTC_LIB={nvrtc}"]
    (root / "lib" / "libnvrtc.so").write_text("")                        # the toolkit's own: CMake finds it
    assert not any("nvrtc" in f for f in build.cuda_cmake_flags(tmp_path / "site"))
    monkeypatch.setenv("CUDA_HOME", str(root))                           # an explicit root wins
    assert build.cuda_root() == root
