#!/usr/bin/env bash
# Set up the router, start a local DICOM receiver, route the bundled example job to it
# and show what arrived. Runs on a fresh machine with Python 3.10+ and pip.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."

python -m pip install --quiet --disable-pip-version-check -e .

port=${EXAMPLE_PORT:-11112}
work=$(mktemp -d)
cp -r "$here/job" "$work/job"      # routing writes its record into the job folder
mkdir "$work/received"

# A receiver that accepts any called AE title: pynetdicom's storescp application.
python -m pynetdicom storescp "$port" --bind-address 127.0.0.1 -od "$work/received" -q &
receiver=$!
trap 'kill $receiver 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  dicom-router echo 127.0.0.1 "$port" ARCHIVE >/dev/null 2>&1 && break
  sleep 0.2
done

export DICOM_ROUTER_ME=127.0.0.1 DICOM_ROUTER_PORT=$port
export DICOM_ROUTER_LOG_FILE="$work/routing.log"
# Fail back quickly in the example (defaults: 3 retries after 5, 10 and 20 s).
export DICOM_ROUTER_RETRIES=1 DICOM_ROUTER_RETRY_DELAY=1

echo "== explain (sends nothing)"
dicom-router explain "$work/job" --config "$here/routing.json"
echo
echo "== route"
status=0
dicom-router route "$work/job" --config "$here/routing.json" || status=$?
echo
echo "== received in $work/received"
ls "$work/received"
echo
echo "== routing log ($DICOM_ROUTER_LOG_FILE)"
cat "$DICOM_ROUTER_LOG_FILE"
exit $status
