"""One distribution, two sides.

The device side lives in device/ and imports as ``edge_infer``; the cloud
worker lives in cloud_worker/ and imports as ``edge_infer_cloud``. Names of
folders are fixed by the client; the import names avoid a bare top-level
``device`` package in site-packages.
"""
from setuptools import setup

DEVICE = [
    "numpy>=1.23",
    "pillow>=9.4",
    "paho-mqtt>=2.1,<3",
    "tomli>=2.0; python_version<'3.11'",
]
TOOLS = ["tqdm>=4.60"]

setup(
    name="edge-infer",
    version="0.1.0",
    description="Hybrid edge/cloud inference runtime for Coral and Jetson devices",
    python_requires=">=3.10",
    packages=["edge_infer", "edge_infer.backends", "edge_infer.calibration", "edge_infer.tools", "edge_infer_cloud"],
    package_dir={"edge_infer": "device", "edge_infer_cloud": "cloud_worker"},
    install_requires=DEVICE,
    extras_require={
        # The default TFLite runtime: maintained, numpy 2, wheels for
        # Python 3.10-3.14 on x86_64 and aarch64, XNNPACK for int8 models.
        "device": ["ai-edge-litert>=2.3,<3"],
        # Coral images pin tflite-runtime; its last release (2.14) needs
        # numpy<2 and has no wheels beyond Python 3.11.
        "tflite-runtime": ["tflite-runtime>=2.14,<2.15", "numpy<2"],
        "cloud": ["onnxruntime>=1.16"],
        # the onnxruntime backend on the device (Jetson without TensorRT); onnxruntime-gpu for CUDA
        "onnx": ["onnxruntime>=1.16"],
        # `edge-infer pki`: the fleet CA and certificates (an admin tool, never on a device)
        "pki": ["cryptography>=42"],
        # the fleet: Ansible roles in deploy/ansible (community.docker's nsenter connection for the fleet test)
        "fleet": ["ansible>=10,<13", "ansible-lint>=24"],
        "systemd": ["systemd-python>=234"],
        # Prometheus metrics ([metrics] enabled = true on the device and the worker; docs/operations.md)
        "metrics": ["prometheus_client>=0.20"],
        # progress bars in the tools (demo, calibrate, model evaluation); never a device dependency
        "tools": TOOLS,
        # `edge-infer calibrate` draws the offload curve (an ML engineer's tool, not a device dependency)
        "calibrate": ["matplotlib>=3.6", *TOOLS],
        # the TensorRT backend on a Jetson or an NVIDIA GPU host: TensorRT's Python bindings come with
        # JetPack (or NVIDIA's wheels); cuda-python allocates its buffers (docs/backends.md)
        "tensorrt": ["cuda-python>=12.6,<14"],
        # onnx: the tests check the structure of the TensorRT Q/DQ model
        "dev": ["pytest>=8", "ruff>=0.5", "systemd-python>=234", "hypothesis>=6.100", "cryptography>=42",
                "prometheus_client>=0.20", "onnx>=1.16", *TOOLS],
    },
    entry_points={
        "console_scripts": [
            "edge-infer=edge_infer.cli:main",
            "edge-infer-cloud-worker=edge_infer_cloud.cli:main",
        ]
    },
)
