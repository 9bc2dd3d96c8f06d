"""`python -m tests.train.gcs_emulator start ...`: gcp-storage-emulator with the one response header it lacks.

Real GCS sends an object's generation as `x-goog-generation` on media downloads; tensorstore (orbax's OCDBT
manifests) reads it to make conditional writes, and without it reports "Malformed StorageGeneration". The handler
is wrapped before the emulator's routes are built; everything else is the package's own server."""

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download

if __name__ == "__main__":
    import sys

    from gcp_storage_emulator.__main__ import main

    sys.exit(main())
