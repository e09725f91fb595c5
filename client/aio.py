"""The asyncio client of the cnp audit service (``grpc.aio``), beside the blocking one.

    from cnp_client.aio import AsyncAuditClient

    async with AsyncAuditClient("127.0.0.1:50051") as client:
        job = await client.submit(spec, experiment="ci", tags={"commit": sha})
        async for progress in client.watch(job.id):
            print(progress.stage, progress.progress)
        report = await client.report(job.id)

Same methods, results, errors, authentication, TLS options and retries as
:class:`cnp_client.AuditClient`; the requests and the retry policy are shared with it
(``cnp_client.calls``). Create it inside the running event loop that uses it.
"""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from cnp.v1 import service_pb2
from cnp_core.spec import AuditSpec

from . import calls
from .client import Artifact, AuditReportView, Job, Progress
from .errors import Internal, from_rpc_error

__all__ = ["AsyncAuditClient"]


class AsyncAuditClient(calls.Endpoint):
    """A connection to one cnp server for asyncio code; see :class:`cnp_client.AuditClient`
    for the options (token, TLS and mutual TLS, timeout, retries)."""

    channels = grpc.aio

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncAuditClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- plumbing ---------------------------------------------------------------------

    async def _backoff(self, err: grpc.RpcError, failures: int) -> None:
        """Sleep before the next try, or raise the typed error when there is none."""
        error = from_rpc_error(err)
        delay = calls.retry_delay(error, failures, self.retries, self.backoff)
        if delay is None:
            raise error from None
        await asyncio.sleep(delay)

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        failures = 0
        while True:
            try:
                return await method(
                    request, timeout=timeout or self.timeout, metadata=self._metadata
                )
            except grpc.RpcError as err:
                await self._backoff(err, failures)
                failures += 1

    # --- jobs -------------------------------------------------------------------------

    async def submit(
        self,
        spec: AuditSpec,
        request_id: str | None = None,
        *,
        experiment: str = "",
        tags: Mapping[str, str] | None = None,
        register_model: str = "",
    ) -> Job:
        """Queue an audit; returns at once. See :meth:`cnp_client.AuditClient.submit`."""
        request = calls.create_request(
            spec, request_id, experiment=experiment, tags=tags, register_model=register_model
        )
        return Job.from_operation(await self._call(self._audit.CreateAudit, request))

    async def get(self, job_id: str) -> Job:
        return Job.from_operation(
            await self._call(self._operations.GetOperation, calls.get_request(job_id))
        )

    async def list(
        self, page_size: int = 50, *, state: str | None = None, limit: int | None = None
    ) -> list[Job]:
        """Jobs, newest first (all pages, or the first ``limit``)."""
        jobs: list[Job] = []
        token = ""
        while True:
            request = calls.list_request(page_size, token, state)
            response = await self._call(self._operations.ListOperations, request)
            jobs += [Job.from_operation(op) for op in response.operations]
            token = response.next_page_token
            if not token or (limit is not None and len(jobs) >= limit):
                return jobs[:limit] if limit is not None else jobs

    async def cancel(self, job_id: str) -> Job:
        """Ask the job to stop (queued: at once; running: at its next check). Returns its state."""
        await self._call(self._operations.CancelOperation, calls.cancel_request(job_id))
        return await self.get(job_id)

    async def delete(self, job_id: str) -> None:
        """Forget a finished job and its files (its MLflow run stays)."""
        await self._call(self._operations.DeleteOperation, calls.delete_request(job_id))

    async def watch(self, job_id: str) -> AsyncIterator[Progress]:
        """Progress updates until the job is final (the last one carries the final state).
        Leaving the ``async for`` early ends the stream on the server too."""
        request = calls.watch_request(job_id)
        failures = 0
        while True:
            stream = self._audit.WatchAudit(request, metadata=self._metadata)
            try:
                async for update in stream:
                    failures = 0
                    progress = Progress.from_proto(update)
                    yield progress
                    if progress.done:
                        return
                return
            except grpc.RpcError as err:
                await self._backoff(err, failures)
                failures += 1
            finally:
                stream.cancel()  # a no-op once the stream has ended

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Until the job is final; DeadlineExceeded after ``timeout`` seconds."""
        deadline = calls.wait_deadline(timeout)
        while True:
            seconds = calls.next_wait(deadline)
            if seconds is None:
                job = await self.get(job_id)
                if job.done:
                    return job
                raise calls.still_running(job_id, job.state, timeout)
            request = calls.wait_request(job_id, seconds)
            operation = await self._call(
                self._operations.WaitOperation, request, timeout=seconds + 10.0
            )
            job = Job.from_operation(operation)
            if job.done:
                return job

    async def report(self, job_id: str) -> AuditReportView:
        """The report of a SUCCEEDED job (FailedPrecondition before)."""
        return AuditReportView(
            await self._call(self._audit.GetAuditReport, calls.report_request(job_id))
        )

    async def audit(
        self,
        spec: AuditSpec,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        experiment: str = "",
        tags: Mapping[str, str] | None = None,
        register_model: str = "",
    ) -> AuditReportView:
        """Submit and wait; the report, or the job's typed error (e.g. InvalidArgument)."""
        job = await self.submit(
            spec,
            request_id=request_id,
            experiment=experiment,
            tags=tags,
            register_model=register_model,
        )
        job = await self.wait(job.id, timeout=timeout)
        if not job.succeeded:
            raise job.error() or Internal(f"audit {job.id} ended {job.state}", audit_id=job.id)
        return await self.report(job.id)

    async def metadata(self) -> service_pb2.ServerMetadata:
        """Version, limits, architectures, formats, methods and composites of the server."""
        return await self._call(self._audit.GetServerMetadata, calls.metadata_request())

    # --- artifacts --------------------------------------------------------------------

    async def artifacts(
        self, job_id: str
    ) -> builtins.list[Artifact]:  # `list` alone: the method above
        response = await self._call(self._audit.ListArtifacts, calls.artifacts_request(job_id))
        return [Artifact.from_proto(a) for a in response.artifacts]

    async def download_artifact(self, job_id: str, name: str, path: str | os.PathLike) -> Path:
        """Stream an artifact to ``path`` (resuming after UNAVAILABLE); checks size and sha256.
        Chunks (1 MiB) are written as they come: a local write is short next to a chunk's
        transfer, so it does not hold up the event loop noticeably."""
        info = calls.find_artifact(job_id, await self.artifacts(job_id), name)
        target = calls.ArtifactFile(job_id, info, path)
        failures = 0
        try:
            while True:  # one stream, resumed from the current offset after UNAVAILABLE
                request = calls.read_request(job_id, name, target.offset)
                stream = self._audit.ReadArtifact(request, metadata=self._metadata)
                try:
                    async for chunk in stream:
                        target.write(chunk)
                    return target.finish()
                except grpc.RpcError as err:
                    await self._backoff(err, failures)
                    failures += 1
                finally:
                    stream.cancel()
        except BaseException:  # a typed error, a cancelled task: no half file stays
            target.discard()
            raise

    async def download_model(
        self, job_id: str, path: str | os.PathLike, *, format: str | None = None
    ) -> Path:
        """The pruned model; see :meth:`cnp_client.AuditClient.download_model`."""
        chosen = calls.choose_model(job_id, await self.artifacts(job_id), path, format)
        return await self.download_artifact(job_id, chosen.name, path)
