# Sourced at the start of a device-tool run: installs the carried wheels (.whl: this project's
# wheel built on the CPU machine, plus cffi and pycparser for the GPU image's Python 3.12).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
