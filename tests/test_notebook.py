"""notebooks/curate_corpus.ipynb runs top to bottom on the bundled samples (nbclient, the venv's python3 kernel)."""

import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat", reason="install the dev extra: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="install the dev extra: pip install -e '.[dev]'")


@pytest.fixture
def kernel_name() -> str:
    """A kernel running this interpreter: ipykernel's built-in ``python3`` spec when it points here,
    else a spec installed into this environment (``--sys-prefix``) on first use."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    pytest.importorskip("ipykernel", reason="install the dev extra: pip install -e '.[dev]'")
    ksm = KernelSpecManager()
    try:
        spec = ksm.get_kernel_spec("python3")
        argv0 = spec.argv[0]
        if argv0 in ("python", "python3", "{python}") or os.path.realpath(argv0) == os.path.realpath(sys.executable):
            return "python3"
    except NoSuchKernel:
        pass
    import subprocess

    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "banklm-venv",
                    "--display-name", "banklm (venv)"], check=True, capture_output=True)
    return "banklm-venv"


def test_curate_corpus_notebook_executes(repo, kernel_name, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    path = repo / "notebooks" / "curate_corpus.ipynb"
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=300,
                                     resources={"metadata": {"path": str(repo)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "builder and notebook agree" in text
    assert "corpora:" in text and "samples:private/records.jsonl" in text  # the recipe snippet
    # a bank's own task spec written, checked and rendered (PII scrubbed in what is printed)
    assert "task 'post_loan' (贷后预警等级) is valid" in text and "2 problems" in text
    assert "(rows 3); e.g. '十天'" in text and "<PHONE>" in text and "13812345678" not in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # length distributions and PII counts
    # the notebook on disk stays without outputs (nothing was written back)
    assert all(not c.get("outputs") for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
