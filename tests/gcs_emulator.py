"""gcp-storage-emulator (python gcs_emulator.py start --port ... as its own command line) with the one header of
GCS it lacks that TensorStore needs: a download's x-goog-generation, the version TensorStore writes an object
back conditionally on (Orbax's OCDBT manifest); without it a second write fails with "Malformed StorageGeneration"."""

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
    try:
        found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = found["generation"]
        response["x-goog-metageneration"] = found["metageneration"]
    except NotFound:  # the download answers 404 itself
        pass
    download(request, response, storage, *args, **kwargs)


objects.download = download_with_generation

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main  # its routes are made now, with the download above

    main()
