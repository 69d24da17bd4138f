#!/usr/bin/env bash
# Set a Prefect server up for dicom-router, from this checkout. Run once, and again after
# changing destinations (limits) or prefect.yaml (deployments).
#   deployments/setup.sh /etc/dicom-router/routing.json /data/jobs
set -euo pipefail
config=${1:?usage: setup.sh ROUTING.json JOBS_ROOT}
jobs_root=${2:?usage: setup.sh ROUTING.json JOBS_ROOT}
cd "$(dirname "$0")/.."
: "${PREFECT_API_URL:?set PREFECT_API_URL (and PREFECT_API_AUTH_STRING) to the Prefect server, e.g. https://prefect-host/api}"

dicom-router validate "$config"
dicom-router setup --config "$config"          # work pool, crash automation, block type, limits
dicom-router config push "$config"             # the rules, editable in the UI from now on
DICOM_ROUTER_JOBS_ROOT=$jobs_root prefect --no-prompt deploy --all
