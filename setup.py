"""AnomalyGPT Edge. The top-level folders install as subpackages of ``anomalygpt_edge``."""
from setuptools import find_packages, setup

PARTS = ('models', 'export', 'runtime', 'calibration', 'benchmarks')

packages = ['anomalygpt_edge']
package_dir = {'anomalygpt_edge': 'cli'}
for part in PARTS:
    for sub in [''] + ['.' + p for p in find_packages(part)]:
        packages.append(f'anomalygpt_edge.{part}{sub}')
        package_dir[f'anomalygpt_edge.{part}{sub}'] = part + sub.replace('.', '/')

setup(
    name='anomalygpt-edge',
    version='0.1.0',
    description='Run the AnomalyGPT vision-language anomaly detector on Jetson, GPU or CPU, offline',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=packages,
    package_dir=package_dir,
    include_package_data=True,
    package_data={'anomalygpt_edge.runtime': ['py.typed']},
    install_requires=[
        # the device side: enough to run a bundle on any CPU
        'numpy>=1.24',
        'opencv-python-headless>=4.8',
        'onnxruntime>=1.18',
        'llama-cpp-python==0.3.36',  # the low-level API (llama_batch with embeddings) is tested against this version
        'gguf>=0.17',                # reads the GGUF's token-embedding rows: the prompt goes to llama.cpp as one batch
        'simplejpeg>=1.7',           # strict JPEG decoding: a JPEG damaged mid-stream is refused, not half-decoded
    ],
    extras_require={
        # training side; install torch first with `pip install torch==2.13.0` (CPU) and open_clip_torch
        # with --no-deps (only its CLIP BPE vocabulary is used; see README)
        'export': ['torch>=2.4', 'transformers>=5.0', 'peft>=0.13', 'sentencepiece>=0.2', 'onnx>=1.16',
                   'onnxscript>=0.5', 'gguf>=0.17', 'ftfy>=6.1', 'regex', 'pillow', 'scipy', 'tqdm'],
        'tensorrt': ['tensorrt', 'pycuda'],  # on Jetson these come with JetPack
        'gpu': ['onnxruntime-gpu'],          # replaces onnxruntime: uninstall it first
        'serve': ['fastapi', 'uvicorn', 'python-multipart'],  # `anomalygpt-edge serve`
        'dev': ['pytest>=8', 'scikit-learn>=1.3', 'matplotlib>=3.7', 'tqdm', 'httpx', 'psutil'],
    },
    entry_points={'console_scripts': ['anomalygpt-edge = anomalygpt_edge.cli:main']},
)
