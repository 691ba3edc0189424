"""Everything the CLI does, from Python: compress, then read the report.

python examples/compress_api.py            # the Fashion-MNIST demo into runs/api-demo
"""

from cascadec.stages import compress

report = compress(
    "cifar_resnet8",
    "fmnist_quick",
    out="runs/api-demo",
    overrides=["train.joint_epochs=1", "prune.target.flops_reduction=0.5"],
    resume=True,  # continue (or just re-report) if the run already exists
)
print(f"teacher {report['teacher']['accuracy']:.4f} -> student {report['student']['accuracy']:.4f}")
print(f"FLOPs {report['teacher']['flops'] / 1e6:.2f}M -> {report['student']['flops'] / 1e6:.2f}M")
print("ONNX parity passed:", report["parity"]["onnxruntime"]["passed"])
