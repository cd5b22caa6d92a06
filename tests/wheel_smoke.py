"""CI's packaging check: a wheel built from the repository, installed with plain pip into a
fresh virtualenv, gives a working ``pilotfish``.

``python -m tests.wheel_smoke`` (from the development virtualenv, which runs the OTLP receiver):
builds the wheel, installs it alone into a new virtualenv, runs ``pilotfish --help``,
``--version`` and ``validate`` on every whole-file example of the docs, and ``pilotfish demo``
(control plane, sidecars over xDS, every phase) whose sidecars export their spans with
OpenTelemetry's OTLP/gRPC exporter to a real receiver. xds-protos has overwritten
opentelemetry-proto's files in that virtualenv (checked), so this also proves that the modules
are built from the descriptors the wheel carries; an embedder's own use of the exporter, after
``pilotfish.otlp_protos.install()``, is checked too.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from tests.doc_examples import whole_file_examples
from tests.observability.otlp_receiver import OtlpReceiver

ROOT = Path(__file__).resolve().parent.parent

OFFICIAL_EXPORT = """
import sys
from pilotfish.otlp_protos import install
assert install(), "the files were overwritten: the hook must be on"
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(sys.argv[1], insecure=True)))
provider.get_tracer("wheel-smoke").start_span("official-exporter").end()
provider.shutdown()
"""


def run(*argv: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(str(a) for a in argv), flush=True)
    # Not from the repository: `python -m` would import its packages instead of the wheel's.
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False,
        cwd=tempfile.gettempdir(),
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"wheel smoke: exit code {result.returncode}")
    return result


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pilotfish-wheel-") as tmp:
        work = Path(tmp)
        run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", work / "dist", ROOT)
        (wheel,) = (work / "dist").glob("pilotfish-*.whl")
        run(sys.executable, "-m", "venv", work / "venv")
        pip, pilotfish = work / "venv/bin/pip", work / "venv/bin/pilotfish"
        run(pip, "install", "--quiet", wheel)
        assert "control-plane" in run(pilotfish, "--help").stdout
        print(run(pilotfish, "--version").stdout.strip())
        examples = whole_file_examples()
        for example in examples:
            path = work / example.name
            path.write_text(example.text, encoding="utf-8")
            print(run(pilotfish, "validate", path).stdout.strip())
        assert len(examples) >= 5, examples

        receiver = OtlpReceiver().start()
        try:
            # As a user runs it: every phase must show its effect (the exit code says so).
            demo = run(pilotfish, "demo", "--otlp-endpoint", receiver.endpoint, timeout=120)
            print(demo.stdout[-600:])
            spans = receiver.wait_for(1, timeout=10)
            print(f"the demo's sidecars exported {len(spans)} spans")

            # xds-protos overwrote opentelemetry-proto's files; the wheel's descriptors serve them.
            deps = run(work / "venv/bin/python", "-m", "pilotfish.deps").stdout
            assert "served from the descriptors bundled with pilotfish" in deps, deps
            print(deps.strip())
            before = len(receiver.spans)
            run(work / "venv/bin/python", "-c", OFFICIAL_EXPORT, receiver.endpoint, timeout=60)
            names = [s.name for s in receiver.wait_for(before + 1, timeout=10)]
            assert "official-exporter" in names, names
        finally:
            receiver.stop()
    print("wheel smoke: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
