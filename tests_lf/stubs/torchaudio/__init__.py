"""Stand-in for torchaudio in the LLaMA-Factory test environment (`make test-lf`).

LLaMA-Factory 0.9.5 imports torchaudio when it loads, but uses it only for audio inputs. PyPI has no
torchaudio build for the CPU torch these tests pin, so this empty module takes its place; text-only SFT
never calls it. With a torchaudio that matches your torch, drop this folder from PYTHONPATH.
"""


def __getattr__(name):
    raise ImportError(
        f"torchaudio.{name}: this is the test environment's stand-in (tests_lf/stubs); install a torchaudio "
        "build that matches your torch for audio inputs"
    )
