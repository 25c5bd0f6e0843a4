"""Zero-cost inference: the exported model vs a freshly built plain smp model holding the same weights.

    python examples/benchmarks/inference.py                 # Unet-resnet34, 256², batch 8
    python examples/benchmarks/inference.py --arch FPN --batch 1

Prints parameter counts, whether outputs are bit-identical, the eval latency ratio (interleaved, median),
the cost the head would add if it were kept at inference (as the reference code does), and TorchScript /
ONNX export of the exported model when those are available.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io

import torch

from adst_examples.benchmarks._common import ARCH_NAMES, build_plain_model, interleaved_medians
from adst_examples.training.distributed import describe_device, resolve_device
from adst_examples.training.models import count_params
from adst_plugin import ADSTLoss, wrap_with_adst


def onnx_check(model: torch.nn.Module, x: torch.Tensor) -> str:
    """Export to ONNX and check the graph; with onnxruntime also compare its output with torch's."""
    try:
        import onnx
    except ImportError:
        return 'skipped (pip install -e "./examples[bench]")'
    buffer = io.BytesIO()
    model, x = model.cpu().eval(), x.cpu()
    try:
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["images"], output_names=["masks"])
        onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    except Exception as error:  # report, don't hide: the table shows the failure
        return f"failed: {type(error).__name__}: {str(error)[:80]}"
    try:
        import onnxruntime
    except ImportError:
        return "ok (checker; no onnxruntime to compare outputs)"
    ort = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (ort_out,) = ort.run(None, {"images": x.numpy()})
    with torch.no_grad():
        diff = (torch.from_numpy(ort_out) - model(x)).abs().max().item()
    return f"ok (onnxruntime max abs diff {diff:.1e})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="Unet", choices=ARCH_NAMES)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    model = wrap_with_adst(build_plain_model(args.arch, args.encoder)).to(device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    # One training step so weights and BN statistics are not the initial ones.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ADSTLoss(model)(model(x), (x[:, :1] > 0.5).float()).backward()
    optimizer.step()
    model.eval()

    exported = model.export()
    fresh = build_plain_model(args.arch, args.encoder, seed=123).to(device).eval()
    fresh.load_state_dict(exported.state_dict())
    with torch.inference_mode():
        identical = torch.equal(exported(x), fresh(x)) and torch.equal(exported(x), model(x))

        def run_exported():
            exported(x)

        def run_fresh():
            fresh(x)

        def run_head_kept():
            model.forward_adst(x)

        medians = interleaved_medians(
            {"fresh": run_fresh, "exported": run_exported, "head_kept": run_head_kept},
            args.steps,
            args.warmup,
        )

    scripted = "n/a"
    if getattr(type(exported), "_is_torch_scriptable", True):
        try:
            torch.jit.script(exported)
            scripted = "ok"
        except Exception as error:  # report, don't hide: the table shows the failure
            scripted = f"failed: {type(error).__name__}"
    onnx_status = onnx_check(exported, x[:1])

    result = {
        "params_fresh": count_params(fresh),
        "params_exported": count_params(exported),
        "identical": identical,
        "ratio": medians["exported"] / medians["fresh"],
        "head_kept_ratio": medians["head_kept"] / medians["fresh"],
        "fresh_s": medians["fresh"],
        "exported_s": medians["exported"],
        "torchscript": scripted,
        "onnx": onnx_status,
    }
    print(f"\n# Zero-cost inference — {describe_device(device)} — {dt.date.today()}")
    print(f"{args.arch}-{args.encoder}, {args.size}², batch {args.batch}, median of {args.steps} eval forwards\n")
    print(
        "| params plain | params exported | bit-identical | exported/plain latency | head-kept/plain latency "
        "| TorchScript | ONNX |"
    )
    print("|---|---|---|---|---|---|---|")
    extra = result["params_exported"] - result["params_fresh"]
    print(
        f"| {result['params_fresh']:,} | {result['params_exported']:,} (+{extra}) | {identical} "
        f"| {result['ratio']:.3f}x | {result['head_kept_ratio']:.2f}x | {scripted} | {onnx_status} |"
    )
    return result


if __name__ == "__main__":
    main()
