"""A web demo (Gradio): upload a file, pick the sampler steps and the cutoff, listen to the input and the
output, see their spectrograms side by side, download the result.

    jat-web --checkpoint runs/real [--port 7860] [--host 127.0.0.1] [--device auto]

Needs the `web` extra (`pip install 'jat-audiosr[web]'`). The page runs the same path as `jat-infer`:
`jat.infer.files.read_input` (every format soundfile reads, any rate and channel count, a clear error
naming the problem), `Upsampler.upsample`, and a 44.1 kHz WAV that keeps the input's resolution.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from jat.checkpoint.store import CheckpointError, resolve_checkpoint
from jat.codecs.base import SAMPLE_RATE
from jat.data.audio import AudioError

MAX_STEPS = 64  # the slider's range; the checkpoint's own default starts it


def parse_cutoff(text: str) -> float | str:
    """'auto', '8000', '8k' -> 'auto' or Hz (the same forms `jat-infer --cutoff` takes)."""
    from jat.cli.infer import parse_cutoff as parse

    try:
        return parse(text or "auto")
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


def upsample_file(up, path: str | Path, steps: int, cutoff: str, out_dir: Path) -> tuple[Path, Path, str]:
    """Upsample one uploaded file: (output WAV, spectrogram PNG, a one-line report)."""
    from jat.evaluation.plots import spectrogram_figure
    from jat.infer.files import output_subtype, read_input, write_output

    path = Path(path)
    audio, sr, subtype = read_input(path)  # [C, L] at its own rate; AudioError naming the file
    res = up.upsample(audio, sr, steps=int(steps), cutoff=parse_cutoff(cutoff))
    out_dir.mkdir(parents=True, exist_ok=True)
    wav = write_output(out_dir / f"{path.stem}_jat.wav", res.audio, output_subtype("wav", subtype),
                       overwrite=True)
    png = out_dir / f"{path.stem}_jat.png"
    spectrogram_figure({"input": res.input, "output": res.audio}, SAMPLE_RATE, png)
    report = (f"{path.name}: {sr} Hz, {audio.shape[0]} channel(s), {res.duration:.2f} s; cutoff "
              f"{res.cutoff:.0f} Hz; {int(steps)} steps; real-time factor {res.rtf['total']:.2f}")
    return wav, png, report


def build_app(up, title: str = "JaT-AudioSR"):
    """The Gradio Blocks app over an Upsampler."""
    import gradio as gr

    out_root = Path(tempfile.mkdtemp(prefix="jat-web-"))
    default_steps = up.cfg.flow.steps if up.cfg is not None else 16

    def run(file, steps, cutoff):
        if file is None:
            raise gr.Error("upload an audio file first")
        try:
            wav, png, report = upsample_file(up, file, steps, cutoff, Path(tempfile.mkdtemp(dir=out_root)))
        except (AudioError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        return str(wav), str(png), str(wav), report

    with gr.Blocks(title=title) as app:
        name = Path(up.checkpoint).name if up.checkpoint is not None else "-"
        gr.Markdown(f"# {title}\nBand-limited audio in, 44.1 kHz out. Checkpoint: `{name}`")
        with gr.Row():
            with gr.Column():
                source = gr.Audio(label="input", type="filepath", sources=["upload"], elem_id="input-audio")
                steps = gr.Slider(1, MAX_STEPS, value=min(default_steps, MAX_STEPS), step=1,
                                  label="sampler steps")
                cutoff = gr.Textbox(value="auto", label="cutoff (Hz, e.g. 8000 or 8k, or auto)")
                button = gr.Button("Upsample", variant="primary", elem_id="upsample")
            with gr.Column():
                output = gr.Audio(label="output (44.1 kHz)", type="filepath", elem_id="output-audio")
                spectrogram = gr.Image(label="spectrograms: input | output", type="filepath",
                                       elem_id="spectrogram")
                download = gr.File(label="download", elem_id="download")
                report = gr.Textbox(label="report", elem_id="report")
        button.click(run, [source, steps, cutoff], [output, spectrogram, download, report])
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint, run folder, inference folder or hf://org/name")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web demo needs Gradio: pip install 'jat-audiosr[web]'", file=sys.stderr)
        return 2
    from jat.infer.upsampler import Upsampler

    try:
        up = Upsampler.from_checkpoint(resolve_checkpoint(args.checkpoint), device=args.device)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    build_app(up).launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0
