// Package ctlapi is govmm's control API: HTTP/JSON over a unix socket, in
// the manner of Firecracker and Cloud Hypervisor. `govmm run --api-sock`
// serves it and `govmm ctl` is its client.
//
// It owns the wire: the routes, the JSON bodies, the NDJSON progress
// stream of a migration and of replication's initial sync, the mapping of errors to HTTP statuses and back,
// the Prometheus text exposition of /metrics, and the socket file's life
// (refuse a live server, remove a stale socket, mode 0600). It does not own
// what the operations do: a running VMM implements Backend, and ctlapi only
// calls it.
//
// Routes (every error body is {"error": "..."}):
//
//	GET  /vm           Info
//	PUT  /vm/pause     Pause             409 when the backend says ErrConflict
//	PUT  /vm/resume    Resume            409 likewise
//	PUT  /vm/snapshot  {"path": "/abs"}  SnapshotResult
//	PUT  /vm/migrate   {"to": "host:port", "force": bool} streams NDJSON lines, in order:
//	                   {"progress": Progress} ... then exactly one of
//	                   {"result": MigrateResult} or {"error": "...", "status": N}
//	PUT  /vm/replicate {"to": "host:port", "epoch": "25ms", "epoch_max": "200ms"} streams NDJSON
//	                   likewise: {"progress": Progress} (phase "sync", last "sync-ack") ...
//	                   then {"result": ReplicateResult} or an error line
//	PUT  /vm/replicate/stop  204
//	GET  /stats        Stats as JSON, in SortMetrics's order, with what the
//	                   backend derived from them (Stats.Derived)
//	GET  /metrics      Prometheus text exposition format 0.0.4, sorted
//
// ServeMetrics (with MetricsHandler) serves GET /metrics alone on a TCP
// address that Prometheus scrapes (govmm run --metrics-listen).
//
// Invariants, each checked by a test: an unknown path is 404 and a known
// path with the wrong method is 405 (with Allow); a malformed or unknown
// field in a body is 400 and a body over MaxBodyBytes is 413, never a
// panic; at most one snapshot or migration runs at a time (a second is
// 409); a client that goes away cancels the backend's context; Close
// cancels every backend call in flight and waits for them to return.
//
// Goroutines: Serve starts one that accepts connections, and net/http runs
// one per connection; each calls the Backend, so a Backend must be safe for
// concurrent use. During a migration or an initial sync the backend's progress callback never
// blocks: updates queue (coalesced if the client reads slowly) and a writer
// goroutine owned by the request drains them. Close waits for all of them.
package ctlapi
