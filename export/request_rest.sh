#!/usr/bin/env bash
# REST request to TF Serving: ./request_rest.sh image.jpg [host:port] [model]
set -euo pipefail
image=$1; host=${2:-localhost:8501}; model=${3:-vit-hybrid-tiny}
b64=$(base64 -w0 "$image")
curl -s -X POST "http://$host/v1/models/$model:predict" \
  -d "{\"signature_name\": \"serving_default\", \"instances\": [{\"image_bytes\": {\"b64\": \"$b64\"}}]}"
