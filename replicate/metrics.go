package replicate

import (
	"context"
	"log/slog"
	"sort"
	"strconv"
	"time"

	"govmm/replicate/stream"
)

// EpochStats describes one checkpoint.
type EpochStats struct {
	Epoch uint64
	Pause time.Duration // guest stopped: stop + harvest + copy + state + resume
	Stop  time.Duration // pausing the vCPUs and quiescing devices
	// Harvest is the dirty-log harvest in the pause; PreHarvest the one
	// just before it, the guest running (preharvest.go; zero with
	// NoPreHarvest), whose pages the pause's harvest need not re-arm.
	Harvest    time.Duration
	PreHarvest time.Duration
	// Copy is the pause's part in copying the dirty pages: all of the
	// copy (CopyMode "stop"), or write-protecting them ("cow").
	Copy time.Duration
	// State is what the state save adds after the copy: the vCPUs read
	// their registers while the harvest and the copy run (on their own
	// threads), then come the chips, the clock, the devices, the
	// encoding, the disk writes and sealing the epoch's output.
	State time.Duration
	// CopyMode is how this checkpoint copied its pages: "stop" or "cow"
	// (with CopyAuto, chosen by its dirty set: ReplicateConfig.CoWPages).
	CopyMode string
	// Background is, with "cow", the time from the resume until every
	// page was copied and un-protected (the guest ran meanwhile).
	Background time.Duration
	DirtyPages int
	Bytes      uint64        // on the wire for this checkpoint
	AckTime    time.Duration // from resume to the standby's ack
	Length     time.Duration // from the previous resume to this pause
	// Target is the epoch length the loop aimed at when this checkpoint
	// was taken: Epoch, or with adaptive epochs (MaxEpoch) up to MaxEpoch.
	Target time.Duration
}

type totals struct {
	Epochs, DirtyPages, Bytes uint64
	Acked                     uint64
	// Pause counts every checkpoint's pause; Ack every acknowledged
	// checkpoint's time from resume to ack.
	Pause, Ack Histogram
	// Backpressured counts the epochs stretched waiting for the standby
	// (MaxUnacked reached), for BackpressureSum in all; EarlyEpochs those
	// cut short by disk pressure.
	Backpressured   uint64
	BackpressureSum time.Duration
	EarlyEpochs     uint64
	// CoWEpochs counts the checkpoints that copied on write (the others
	// copied with the guest stopped).
	CoWEpochs uint64
}

const recentEpochs = 1024

func (r *Replicator) record(es EpochStats) {
	r.mu.Lock()
	defer r.mu.Unlock()
	es.Target = r.target
	r.logEpoch(es)
	r.recent = append(r.recent, es)
	if len(r.recent) > recentEpochs {
		r.recent = r.recent[len(r.recent)-recentEpochs:]
	}
	r.totals.Epochs++
	r.totals.DirtyPages += uint64(es.DirtyPages)
	r.totals.Bytes += es.Bytes
	r.totals.Pause.Observe(es.Pause)
	if es.CopyMode == string(CopyCoW) {
		r.totals.CoWEpochs++
	}
}

// logEpoch prints one checkpoint's breakdown at debug level
// (GOVMM_LOG=debug): where a slow pause goes, checkpoint by checkpoint.
func (r *Replicator) logEpoch(es EpochStats) {
	if r.log == nil || !r.log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	r.log.Debug("checkpoint", "epoch", es.Epoch, "copy", es.CopyMode, "dirty_pages", es.DirtyPages,
		"length", es.Length, "pause", es.Pause, "stop", es.Stop, "pre_harvest", es.PreHarvest,
		"harvest", es.Harvest, "copy_time", es.Copy, "state", es.State, "background", es.Background,
		"bytes", es.Bytes)
}

// DurationBuckets are the upper bounds of the duration histograms (pause,
// ack), about three a decade from 100 µs to 10 s: a checkpoint's pause is
// a few hundred µs for an idle guest and tens of ms for a busy one, and an
// ack over a WAN takes up to a few hundred ms.
var DurationBuckets = [...]time.Duration{
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second,
}

// Histogram counts durations by DurationBuckets, as a Prometheus
// histogram does. The zero value is empty and ready to use; it is a
// value, so a copy is a snapshot.
type Histogram struct {
	// Counts has one count per bucket of DurationBuckets and a last one
	// for what is larger; each counts the observations in its bucket only
	// (not cumulative).
	Counts [len(DurationBuckets) + 1]uint64
	Sum    time.Duration
	Count  uint64
}

// Observe adds one duration.
func (h *Histogram) Observe(d time.Duration) {
	i := sort.Search(len(DurationBuckets), func(i int) bool { return d <= DurationBuckets[i] })
	h.Counts[i]++
	h.Sum += d
	h.Count++
}

// metrics are h's samples as a Prometheus histogram family name:
// name_bucket{le=...} (cumulative, +Inf last), name_sum and name_count.
func (h Histogram) metrics(name, help string) []Metric {
	out := make([]Metric, 0, len(h.Counts)+2)
	var cum uint64
	for i, n := range h.Counts {
		cum += n
		le := "+Inf"
		if i < len(DurationBuckets) {
			le = strconv.FormatFloat(DurationBuckets[i].Seconds(), 'g', -1, 64)
		}
		out = append(out, Metric{Name: name + "_bucket", Help: help, Type: "histogram", Value: float64(cum),
			Labels: map[string]string{"le": le}})
	}
	return append(out,
		Metric{Name: name + "_sum", Help: help, Type: "histogram", Value: h.Sum.Seconds()},
		Metric{Name: name + "_count", Help: help, Type: "histogram", Value: float64(h.Count)})
}

// ReplicationStats summarise replication for metrics.
type ReplicationStats struct {
	Protected                 bool
	Epoch, Acked              uint64
	Epochs, DirtyPages, Bytes uint64
	// CoWEpochs are the Epochs that copied on write, the others copied
	// with the guest stopped (ReplicateConfig.Copy; CopyAuto mixes them).
	CoWEpochs                    uint64
	PauseP50, PauseP99, PauseMax time.Duration // over the last 1024 epochs
	// Pause is the distribution of every checkpoint's pause, Ack that of
	// every acknowledged checkpoint's time from resume to ack.
	Pause, Ack Histogram
	Last       EpochStats
	// HeldFrames and HeldBytes are the guest's output waiting for acks,
	// over every output buffer.
	HeldFrames, HeldBytes int
	// Backpressured epochs waited BackpressureSum for the standby;
	// EarlyEpochs were ended early by disk pressure.
	Backpressured, EarlyEpochs uint64
	BackpressureSum            time.Duration
	// EpochLength is the epoch the loop aims at now: the configured one,
	// or with adaptive epochs what the load has made it.
	EpochLength time.Duration
	// Stream is the transport's counters since it opened (the initial
	// sync included): pages, their bytes before and after compression,
	// deltas, and the codec the two ends agreed on.
	Stream stream.Stats
}

// Stats reports counters and the pause-time distribution of recent epochs.
func (r *Replicator) Stats() ReplicationStats {
	var held, heldBytes int
	for _, o := range r.cfg.Outputs {
		st := o.Stats()
		held += st.HeldFrames
		heldBytes += st.HeldBytes
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	s := ReplicationStats{Protected: r.protected, Epoch: r.epoch, Acked: r.totals.Acked, Epochs: r.totals.Epochs,
		DirtyPages: r.totals.DirtyPages, Bytes: r.totals.Bytes, CoWEpochs: r.totals.CoWEpochs, Pause: r.totals.Pause, Ack: r.totals.Ack,
		HeldFrames: held, HeldBytes: heldBytes, Backpressured: r.totals.Backpressured,
		BackpressureSum: r.totals.BackpressureSum, EarlyEpochs: r.totals.EarlyEpochs, EpochLength: r.target}
	if r.t != nil {
		s.Stream = r.t.Stats()
	}
	if len(r.recent) > 0 {
		s.Last = r.recent[len(r.recent)-1]
		p := make([]time.Duration, len(r.recent))
		for i, e := range r.recent {
			p[i] = e.Pause
		}
		sort.Slice(p, func(i, j int) bool { return p[i] < p[j] })
		s.PauseP50, s.PauseP99, s.PauseMax = p[len(p)/2], p[(len(p)*99)/100], p[len(p)-1]
	}
	return s
}

// Recent returns the stats of the last epochs (oldest first).
func (r *Replicator) Recent() []EpochStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]EpochStats(nil), r.recent...)
}

// Metric is one sample in the Prometheus sense. It has the fields of
// ctlapi.Metric, so the control API takes it by conversion.
type Metric struct {
	Name   string
	Help   string
	Type   string // "counter", "gauge" or "histogram"
	Labels map[string]string
	Value  float64
}

// Metrics are replication's counters, gauges and histograms, named
// govmm_replication_* and govmm_output_*, and the stream's page counters,
// govmm_stream_sent_* and govmm_stream_info (StreamMetrics).
func (r *Replicator) Metrics() []Metric {
	rs := r.Stats()
	var out []Metric
	add := func(name, help, typ string, v float64, labels map[string]string) {
		out = append(out, Metric{Name: name, Help: help, Type: typ, Value: v, Labels: labels})
	}
	add("govmm_replication_protected", "1 while a standby holds a current checkpoint; 0 means the guest runs UNPROTECTED", "gauge", b2f(rs.Protected), nil)
	add("govmm_replication_epoch", "last checkpoint taken", "gauge", float64(rs.Epoch), nil)
	add("govmm_replication_acked_epoch", "last checkpoint the standby acknowledged", "gauge", float64(rs.Acked), nil)
	add("govmm_replication_epochs_total", "checkpoints taken", "counter", float64(rs.Epochs), nil)
	copyHelp := "checkpoints taken, by how they copied the dirty pages: stop (with the guest stopped) or cow (write-protected in the pause, copied after the resume)"
	add("govmm_replication_copy_epochs_total", copyHelp, "counter", float64(rs.Epochs-rs.CoWEpochs), map[string]string{"copy": string(CopyStop)})
	add("govmm_replication_copy_epochs_total", copyHelp, "counter", float64(rs.CoWEpochs), map[string]string{"copy": string(CopyCoW)})
	add("govmm_replication_dirty_pages_total", "pages shipped in checkpoints", "counter", float64(rs.DirtyPages), nil)
	add("govmm_replication_bytes_total", "bytes sent in checkpoints", "counter", float64(rs.Bytes), nil)
	add("govmm_replication_unacked_checkpoints", "checkpoints taken and not yet acknowledged", "gauge", float64(rs.Epoch-min(rs.Acked, rs.Epoch)), nil)
	add("govmm_replication_backpressure_epochs_total", "epochs stretched because the standby had not acknowledged enough checkpoints", "counter", float64(rs.Backpressured), nil)
	add("govmm_replication_backpressure_seconds_total", "time epochs were stretched waiting for the standby", "counter", rs.BackpressureSum.Seconds(), nil)
	add("govmm_replication_early_epochs_total", "epochs ended early because the guest wrote much to disk", "counter", float64(rs.EarlyEpochs), nil)
	out = append(out, rs.Pause.metrics("govmm_replication_pause_seconds", "time the guest was paused for each checkpoint")...)
	out = append(out, rs.Ack.metrics("govmm_replication_ack_seconds", "time from a checkpoint's resume to the standby's ack")...)
	l := rs.Last
	add("govmm_replication_last_pause_seconds", "pause of the last checkpoint", "gauge", l.Pause.Seconds(), nil)
	add("govmm_replication_last_dirty_pages", "dirty pages in the last checkpoint", "gauge", float64(l.DirtyPages), nil)
	add("govmm_replication_last_bytes", "bytes of the last checkpoint", "gauge", float64(l.Bytes), nil)
	add("govmm_replication_last_epoch_seconds", "length of the last epoch", "gauge", l.Length.Seconds(), nil)
	add("govmm_replication_epoch_target_seconds", "epoch length the checkpoint loop aims at now: --epoch, or with adaptive epochs (--epoch-max) what the load has made it", "gauge", rs.EpochLength.Seconds(), nil)
	for i, d := range r.cfg.Disks {
		disk := map[string]string{"disk": strconv.Itoa(i)}
		add("govmm_replication_disk_written_bytes_total", "bytes the guest wrote to the disk (--disk, in order from 0) since replication started, each carried by its checkpoint", "counter", float64(d.Written()), disk)
		add("govmm_replication_disk_zeroed_bytes_total", "bytes of the disk the guest discarded or zeroed since replication started, carried as zero runs (a few bytes each)", "counter", float64(d.Zeroed()), disk)
	}
	add("govmm_output_held_packets", "guest packets held until their checkpoint is acknowledged", "gauge", float64(rs.HeldFrames), nil)
	add("govmm_output_held_bytes", "guest bytes held until their checkpoint is acknowledged", "gauge", float64(rs.HeldBytes), nil)
	return append(out, StreamMetrics(rs.Stream, true)...)
}

// StreamMetrics are a stream end's page and disk counters: on the sending
// end (sent) govmm_stream_sent_pages_total, _zero_pages_total,
// _delta_pages_total, _copy_pages_total, _disk_bytes_total,
// _disk_wire_bytes_total (as they travelled), _page_bytes_total (before
// compression), _page_wire_bytes_total (as they travelled),
// _state_bytes_total, _state_wire_bytes_total (as they travelled) and the
// ack reader's polls (stream.Config.AckSpin), _ack_poll_hits_total and
// _ack_poll_misses_total, and the send buffer it fixed,
// govmm_stream_send_buffer_bytes (0: the kernel's); on the receiving end govmm_stream_received_pages_total,
// _zero_pages_total, _delta_pages_total, _copy_pages_total,
// _disk_bytes_total (a receiver does not count page bytes) and the
// reader's polls inside a checkpoint (stream.Config.ReadSpin),
// govmm_stream_received_poll_hits_total and _poll_misses_total; on both,
// govmm_stream_info{compression, deltas}, 1, once the handshake agreed on
// them.
func StreamMetrics(st stream.Stats, sent bool) []Metric {
	dir := "received"
	if sent {
		dir = "sent"
	}
	var out []Metric
	counter := func(name, help string, v uint64) {
		out = append(out, Metric{Name: "govmm_stream_" + dir + "_" + name, Help: help, Type: "counter", Value: float64(v)})
	}
	counter("pages_total", "guest pages "+dir+" on the stream since it opened (initial sync included)", st.Pages)
	counter("zero_pages_total", "of the pages "+dir+", all-zero ones (a flag, no bytes)", st.ZeroPages)
	counter("delta_pages_total", "of the pages "+dir+", those that travelled as XOR deltas against what the standby holds", st.DeltaPages)
	counter("copy_pages_total", "of the pages "+dir+", those that travelled as a reference to a page with the same bytes that the standby holds", st.CopyPages)
	counter("disk_bytes_total", "disk bytes "+dir+" in Disk frames since the stream opened (initial sync included): written, or made zeros by a zero run", st.DiskBytes)
	if sent {
		counter("page_bytes_total", "bytes of the pages sent before compression: their page sections (entries and data, a delta as its XOR page, a copy as its 12 bytes)", st.PageBytes)
		counter("disk_wire_bytes_total", "bytes of the Disk frames sent as they travelled: their payloads, compressed or stored with their header, before sealing", st.DiskWireBytes)
		counter("page_wire_bytes_total", "bytes of the pages sent as they travelled: the Pages frames' payloads, compressed or stored with their header, before sealing", st.PageWireBytes)
		counter("state_bytes_total", "bytes of machine state sent, one copy per checkpoint", st.StateBytes)
		counter("state_wire_bytes_total", "bytes of the State frames sent as they travelled: their payloads, an XOR with the last checkpoint's state compressed, or stored, with their header, before sealing", st.StateWireBytes)
		counter("ack_poll_hits_total", "reads for an awaited ack that found the connection drained and, polling (govmm run --ack-spin), the ack within the spin: a sleep and a wakeup saved", st.PollHits)
		out = append(out, Metric{Name: "govmm_stream_send_buffer_bytes", Help: "the sending socket's send buffer as the stream fixed it (SO_SNDBUF; the default fixes it on a link whose round trip is under 100 µs), 0 where it is the kernel's, autotuned",
			Type: "gauge", Value: float64(st.SendBuffer)})
		counter("ack_poll_misses_total", "reads for an awaited ack that polled a drained connection for the whole spin (--ack-spin), found nothing and slept: the spin's CPU spent for nothing", st.PollMisses)
	} else {
		counter("poll_hits_total", "reads inside a checkpoint that found the connection drained and, polling (govmm standby --read-spin), bytes within the spin: a sleep and a wakeup saved", st.PollHits)
		counter("poll_misses_total", "reads inside a checkpoint that polled a drained connection for the whole spin (--read-spin), found nothing and slept: the spin's CPU spent for nothing", st.PollMisses)
	}
	if st.Compression != "" {
		out = append(out, Metric{Name: "govmm_stream_info", Help: "1: the page codec, deltas and cipher the stream's two ends agreed on (cipher none: unkeyed, loopback only)",
			Type: "gauge", Value: 1, Labels: map[string]string{"compression": st.Compression, "deltas": strconv.FormatBool(st.Deltas), "cipher": st.Cipher}})
	}
	return out
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
