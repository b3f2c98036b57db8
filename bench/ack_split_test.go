package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"govmm/replicate/stream"
	"govmm/vmm/guestmem"
)

// The standby end, run here on pipes: it answers its point with two
// addresses, acknowledges a checkpoint on the stream and a transfer on
// the bound, reports CPU time that grows with the work, and returns once
// its stdin closes.
func TestAckStandbyEndServesAPoint(t *testing.T) {
	for _, m := range []ackMode{{}, {keyed: true, cipher: stream.CipherAEGISX2}, {keyed: true, cipher: stream.CipherAEGIS}, {keyed: true, cipher: stream.CipherAESGCM}} {
		keyed := m.keyed
		t.Run(m.String(), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			defer cancel()
			inR, inW := io.Pipe()
			outR, outW := io.Pipe()
			ended := make(chan error, 1)
			go func() { ended <- AckStandbyEnd(ctx, inR, outW); outW.Close() }()
			out := bufio.NewReader(outR)

			const n = 64
			var key []byte
			k, cs := "-", "-"
			if keyed {
				key = make([]byte, 32)
				key[0] = 7
				k, cs = fmt.Sprintf("%x", key), m.cipher.String()
			}
			_, err := fmt.Fprintf(inW, "%d %s %s\n", n, k, cs)
			require.NoError(t, err)
			line, err := out.ReadString('\n')
			require.NoError(t, err)
			f := strings.Fields(line)
			require.Len(t, f, 4, line)
			require.Equal(t, "stream", f[0])
			require.Equal(t, "bound", f[2])

			end := &splitEnd{stdin: inW, stdout: out}
			askCPU := func() (cpu, open time.Duration) {
				d, o, err := end.cpu()
				require.NoError(t, err)
				return d, o
			}
			cpu0, open0 := askCPU()
			assert.Zero(t, open0, "nothing opened before the stream is dialled")

			_, scfg := ackConfigs(n, key, m.cipher, stream.SendBufferAuto)
			s, err := stream.Dial(ctx, f[1], scfg)
			require.NoError(t, err)
			defer s.Close()
			if keyed {
				require.Equal(t, m.cipher.String(), s.Cipher(), "the end seals as its point says")
			} else {
				require.Equal(t, "none", s.Cipher())
			}
			gen := make([]byte, n*guestmem.PageSize)
			for i := range gen {
				gen[i] = byte(i + 1)
			}
			src, sums := stagePages(gen)
			for epoch := uint64(1); epoch <= 20; epoch++ {
				require.NoError(t, ackCheckpoint(ctx, s, epoch, src, sums, make([]byte, 512)))
			}
			assert.Equal(t, uint64(20), s.Stats().Acks)

			// The bound's connection and the tuned bound's, both served.
			c, err := net.Dial("tcp", f[3])
			require.NoError(t, err)
			defer c.Close()
			tuned, err := net.Dial("tcp", f[3])
			require.NoError(t, err)
			defer tuned.Close()
			msg := make([]byte, 8+100_000)
			putLeUint64(msg, 100_000)
			for _, conn := range []net.Conn{tuned, c} {
				_, err = conn.Write(msg)
				require.NoError(t, err)
				ack := make([]byte, 1)
				_, err = io.ReadFull(conn, ack)
				require.NoError(t, err)
				assert.Equal(t, byte(1), ack[0])
			}
			// The held bound: a transfer kept whole (bigger than the reader's
			// megabyte), then another, acked; the applied bound's likewise.
			held := make([]byte, 3<<20+7)
			for _, bits := range []uint64{heldBit, heldBit | appliedBit} {
				require.NoError(t, heldTransfer(c, held, bits))
				require.NoError(t, heldTransfer(c, held[:100], bits))
			}
			if keyed { // the sealed bounds, plain and applied: opened under the point's key, acked; under another, not
				aead, err := stream.NewAEAD(m.cipher, key)
				require.NoError(t, err)
				var nonce sealNonce
				var buf []byte
				p := make([]byte, 3*sealChunk+5)
				for _, bits := range []uint64{0, heldBit | appliedBit, heldBit | appliedBit} {
					require.NoError(t, sealTransfer(c, aead, &nonce, p, &buf, bits))
					require.NoError(t, sealTransfer(c, aead, &nonce, p[:100], &buf, bits), "a second transfer, the nonces counting on")
				}
				other, err := stream.NewAEAD(m.cipher, make([]byte, 32))
				require.NoError(t, err)
				assert.Error(t, sealTransfer(c, other, &nonce, p[:100], &buf, heldBit|appliedBit), "no ack for bytes sealed under another key: the end hangs up")
			}

			cpu1, open1 := askCPU()
			assert.Greater(t, cpu1, cpu0, "the end's CPU time grew with 20 checkpoints")
			if keyed {
				assert.Greater(t, open1, time.Duration(0), "its Receiver opened the keyed stream's frames")
			} else {
				assert.Zero(t, open1, "an unkeyed stream opens nothing")
			}
			require.NoError(t, inW.Close())
			select {
			case err := <-ended:
				assert.NoError(t, err)
			case <-ctx.Done():
				t.Fatal("the standby end did not return after its stdin closed")
			}
		})
	}
}

func TestAckStandbyEndRefusesABadPoint(t *testing.T) {
	for _, line := range []string{"", "100", "x - -", "0 - -", "-5 - -", "100 zz aegis-128l", "100 -", "100 - extra", "100 - - extra",
		"100 00ff", "100 00ff auto", "100 00ff chacha20"} {
		err := AckStandbyEnd(t.Context(), strings.NewReader(line+"\n"), io.Discard)
		assert.Error(t, err, "point %q", line)
	}
}

// Split, the suite runs the standby end as govmm bench --ack-standby-end
// on a CPU of its own; its CPU time is counted beside this process's,
// and this process's threads get back every CPU they had.
func TestAckSplit(t *testing.T) {
	var before unix.CPUSet
	require.NoError(t, unix.SchedGetaffinity(0, &before))
	if before.Count() < 2 {
		t.Skipf("split needs two CPUs; this test may run on %d", before.Count())
	}
	govmm := buildGovmm(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	out := t.TempDir()
	res, err := Ack(ctx, AckConfig{Pages: []int{100}, Rounds: 2, Batch: 20 * time.Millisecond, Gaps: []time.Duration{0},
		Split: true, Govmm: govmm, Out: out, Log: testWriter{t}, Ciphers: []stream.Cipher{stream.CipherAEGISX2, stream.CipherAESGCM},
		SendBuffers: []int{stream.SendBufferAuto, stream.SendBufferKernel}})
	require.NoError(t, err)
	// 2 rounds: keyed under AEGIS-128X2 and under AES-256-GCM, each a
	// stream, bound, tuned, sealed and sealed applied bound; unkeyed
	// stream, bound, tuned, held and applied bound; each with the
	// stream's send buffer its default and the kernel's.
	require.Len(t, res.Samples, 60)
	kinds := map[string]int{}
	for _, s := range res.Samples {
		kinds[s.Kind]++
		assert.GreaterOrEqual(t, s.Acks, 3)
		assert.Positive(t, s.StandbyCPU, "%+v: the standby end's CPU", s)
		assert.Greater(t, s.CPU, s.StandbyCPU, "%+v: both ends' CPU", s)
		if s.Kind == "stream" && s.Keyed {
			// Both passes happen between a checkpoint's start and its ack.
			assert.Positive(t, s.Seal, "%+v: the Sender sealed", s)
			assert.Positive(t, s.Open, "%+v: the standby end's Receiver opened", s)
			assert.Less(t, s.Seal, s.Wall, "%+v: sealing within the time to ack", s)
			assert.Less(t, s.Open, s.Wall, "%+v: opening within the time to ack", s)
		} else {
			assert.Zero(t, s.Seal, "%+v: no stream sealed in this batch", s)
			assert.Zero(t, s.Open, "%+v", s)
		}
	}
	assert.Equal(t, map[string]int{"stream": 12, "bound": 12, "tuned": 12, "sealed": 8, "held": 4, "applied": 12}, kinds)
	// The modes take turns within each round: every mode's round 0,
	// then every mode's round 1.
	var turns []string
	for _, s := range res.Samples {
		if s.Kind == "stream" {
			turns = append(turns, fmt.Sprintf("%s %d", modeOf(s), s.Round))
		}
	}
	assert.Equal(t, []string{"keyed aegis-128x2 0", "keyed aes-256-gcm 0", "unkeyed 0",
		"keyed aegis-128x2, send buffer kernel 0", "keyed aes-256-gcm, send buffer kernel 0", "unkeyed, send buffer kernel 0",
		"keyed aegis-128x2 1", "keyed aes-256-gcm 1", "unkeyed 1",
		"keyed aegis-128x2, send buffer kernel 1", "keyed aes-256-gcm, send buffer kernel 1", "unkeyed, send buffer kernel 1"}, turns)
	// Each mode's stream says what send buffer it ended its handshake
	// with: the kernel's where asked, and by default fixed at 256 KiB
	// on a loopback whose round trip is short, as it is on a quiet host.
	require.Len(t, res.SendBuffers, 6)
	for m, sb := range res.SendBuffers {
		if strings.Contains(m, "send buffer kernel") {
			assert.True(t, strings.HasPrefix(sb, "the kernel's (the handshake's round trip "), "%s: %s", m, sb)
		} else {
			assert.Regexp(t, `^(fixed at 256 KiB|the kernel's) \(the handshake's round trip [0-9.]+[µm]s\)$`, sb, m)
		}
	}
	report := res.Report()
	assert.Contains(t, report, "two one-core hosts")
	assert.Contains(t, report, "to tuned median")
	assert.Contains(t, report, "to held median")
	assert.Contains(t, report, "to applied median")
	assert.Contains(t, report, "stream standby CPU ms/ack")
	assert.Contains(t, report, "applied bound standby CPU ms/ack")
	assert.Contains(t, report, "- unkeyed, send buffer kernel: the kernel's")
	assert.Contains(t, report, "**The cipher's passes.**")
	assert.Contains(t, report, "| keyed aes-256-gcm, send buffer kernel | 100 | 0s |", "a keyed mode's row in a table")
	cells, rows := 0, 0 // the header's cells, the rows of three modes
	for _, line := range strings.Split(report, "\n") {
		switch {
		case strings.HasPrefix(line, "| mode |"):
			cells = strings.Count(line, "|")
		case strings.HasPrefix(line, "| unkeyed"), strings.HasPrefix(line, "| keyed aegis-128x2"), strings.HasPrefix(line, "| keyed aes-256-gcm"):
			rows++
			assert.Equal(t, cells, strings.Count(line, "|"), "a row has as many cells as the header: %s", line)
		}
	}
	assert.Positive(t, cells, "the table's header")
	assert.Positive(t, rows, "the table's rows")

	tasks, err := pinnedTasks(before)
	require.NoError(t, err)
	assert.Empty(t, tasks, "threads still pinned after the suite")
}

// pinnedTasks are this process's threads whose affinity is not want.
func pinnedTasks(want unix.CPUSet) ([]int, error) {
	var out []int
	err := eachTask(func(tid int) {
		var got unix.CPUSet
		if unix.SchedGetaffinity(tid, &got) == nil && got != want {
			out = append(out, tid)
		}
	})
	return out, err
}

// The held bound's reader acks a held transfer once it has all of it,
// stays in step for the plain transfers that follow, and hangs up on a
// length it will not hold.
func TestAckEachHeldTransfer(t *testing.T) {
	tx := ackEachConn(t)
	require.NoError(t, heldTransfer(tx, make([]byte, 2<<20+3), heldBit))
	plainTransferAcked(t, tx, "a plain transfer after the held one: the reader kept count")

	var hdr [8]byte
	putLeUint64(hdr[:], uint64(maxHeld+1)|heldBit)
	_, err := tx.Write(hdr[:])
	require.NoError(t, err)
	_, err = io.ReadFull(tx, hdr[:1])
	assert.Error(t, err, "more than maxHeld announced: no ack, the reader hangs up")
}

// ackEachConn is the writing end of a loopback connection whose other
// end ackEach serves (without a key) until the test ends.
func ackEachConn(t *testing.T) net.Conn {
	t.Helper()
	tx, rx, err := loopbackPair(t.Context())
	require.NoError(t, err)
	t.Cleanup(func() { tx.Close() })
	go func() {
		defer rx.Close()
		ackEach(rx, nil)
	}()
	return tx
}

// plainTransferAcked sends a plain 5,000-byte transfer on tx and checks
// its one-byte ack.
func plainTransferAcked(t *testing.T, tx net.Conn, why string) {
	t.Helper()
	msg := make([]byte, 8+5000)
	putLeUint64(msg, 5000)
	_, err := tx.Write(msg)
	require.NoError(t, err)
	ack := make([]byte, 1)
	_, err = io.ReadFull(tx, ack)
	require.NoError(t, err, why)
	assert.Equal(t, byte(1), ack[0])
}

// The applied bound's reader acks a transfer once it holds all of it,
// then copies it into memory while it reads the next into its other
// buffer, and acks that one only after the copy: after two transfers the
// memory holds the second over the first (each copy done before the
// next ack), and the first transfer's buffer was not reused meanwhile.
func TestApplierCopiesWhatItHeld(t *testing.T) {
	var a applier
	first := make([]byte, 3*guestmem.PageSize+100) // a partial page at the end
	for i := range first {
		first[i] = byte(i*7 + 1)
	}
	second := make([]byte, 2*guestmem.PageSize)
	for i := range second {
		second[i] = byte(i*13 + 5)
	}
	copy(a.buffer(len(first)), first)
	require.NoError(t, a.start())
	b := a.buffer(len(second))
	assert.NotSame(t, &first[0], &b[0])
	copy(b, second)
	require.NoError(t, a.start(), "waits for the first copy, starts the second")
	require.Len(t, a.bufs[0], len(first), "the first transfer's buffer, untouched while the second was held")
	require.NoError(t, a.settle())
	got := make([]byte, len(first))
	require.NoError(t, a.mem.ReadAt(got, 0))
	want := append(append([]byte(nil), second...), first[len(second):]...)
	assert.Equal(t, want, got, "the second transfer over the first's start, the first's tail still there")
	a.close()
	assert.Nil(t, a.done, "close waited for the copy")
}

// Over a connection: an applied transfer is acked, a plain one after it
// too (the reader kept count), and an applied length without heldBit
// ends the connection.
func TestAckEachAppliedTransfer(t *testing.T) {
	tx := ackEachConn(t)
	for range 3 {
		require.NoError(t, heldTransfer(tx, make([]byte, 2<<20+3), heldBit|appliedBit))
	}
	plainTransferAcked(t, tx, "a plain transfer after the applied ones")

	msg := make([]byte, 8+5000)
	putLeUint64(msg, 5000|appliedBit)
	_, err := tx.Write(msg)
	require.NoError(t, err)
	ack := make([]byte, 1)
	_, err = io.ReadFull(tx, ack)
	assert.Error(t, err, "appliedBit without heldBit: no ack, the reader hangs up")
}
