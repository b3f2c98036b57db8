package witness

import (
	"bytes"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func frameBytes(t frameType, seq uint64, payload []byte) []byte {
	b := make([]byte, headerSize, headerSize+len(payload))
	putHeader(b, header{length: uint32(len(payload)), typ: t, seq: seq})
	return append(b, payload...)
}

// seedFrames are well-formed frames of every type and a few near misses.
func seedFrames() map[string][]byte {
	h := hello{version: Version, role: roleClient}
	for i := range h.nonce {
		h.nonce[i] = byte(i)
	}
	return map[string][]byte{
		"hello":   frameBytes(frameHello, 0, appendHello(nil, &h)),
		"auth":    frameBytes(frameAuth, 1, bytes.Repeat([]byte{7}, proofSize)),
		"acquire": frameBytes(frameRequest, 2, appendRequest(nil, &request{op: opAcquire, id: 1, vm: "vm0", holder: "primary #1", lease: time.Second})),
		"claim":   frameBytes(frameRequest, 3, appendRequest(nil, &request{op: opAcquire, base: true, gen: 4, id: 2, vm: "vm0", holder: "standby #2", lease: 2 * time.Second})),
		"renew":   frameBytes(frameRequest, 4, appendRequest(nil, &request{op: opRenew, gen: 4, id: 3, vm: "vm0", holder: "primary #1"})),
		"status":  frameBytes(frameRequest, 5, appendRequest(nil, &request{op: opStatus, id: 4, vm: "vm0"})),
		"granted": frameBytes(frameReply, 2, appendReply(nil, &reply{id: 1, result: resultOK, lease: time.Second, gen: 5, remaining: time.Second, holder: "primary #1"})),
		"held":    frameBytes(frameReply, 3, appendReply(nil, &reply{id: 2, result: resultHeld, lease: time.Second, gen: 4, remaining: 300 * time.Millisecond, renewals: 9, holder: "primary #1"})),
		"refused": frameBytes(frameReply, 4, appendReply(nil, &reply{id: 3, result: resultError, message: "state not saved"})),
		"error":   frameBytes(frameError, 2, appendErrorFrame(nil, "authentication failed (wrong key?)")),
		"huge":    {0xff, 0xff, 0xff, 0x7f, byte(frameRequest), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
		"long vm": frameBytes(frameRequest, 2, appendRequest(nil, &request{op: opStatus, id: 1, vm: string(bytes.Repeat([]byte("v"), MaxName+1))})),
	}
}

func TestSeedFramesDecode(t *testing.T) {
	for name, b := range seedFrames() {
		_, _, err := decodeFrame(b)
		if name == "huge" || name == "long vm" {
			require.ErrorIs(t, err, ErrProtocol, name)
			continue
		}
		require.NoError(t, err, name)
	}
}

// FuzzDecodeFrame feeds arbitrary bytes to every decoder of the wire
// (the payload as it is after decryption): never a panic, and whatever
// decodes encodes back to the same bytes.
func FuzzDecodeFrame(f *testing.F) {
	for _, b := range seedFrames() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, v, err := decodeFrame(b)
		if err != nil {
			return
		}
		p := b[headerSize:]
		var again []byte
		switch x := v.(type) {
		case hello:
			again = appendHello(nil, &x)
		case request:
			if x.lease%time.Millisecond != 0 {
				t.Fatalf("lease %v not in milliseconds", x.lease)
			}
			again = appendRequest(nil, &x)
		case reply:
			again = appendReply(nil, &x)
		case string:
			again = appendErrorFrame(nil, x)
		case []byte:
			again = x
		default:
			t.Fatalf("%v frame decoded to %T", h.typ, v)
		}
		if !bytes.Equal(again, p) {
			t.Fatalf("%v frame: decoded and encoded again:\n%x\nwas\n%x", h.typ, again, p)
		}
	})
}

// FuzzDecodeState feeds arbitrary bytes to the state file's decoder:
// never a panic, and what decodes survives an encode.
func FuzzDecodeState(f *testing.F) {
	f.Add(encodeState(nil))
	f.Add(encodeState([]durable{{VM: "vm0", Generation: 3, Holder: "primary #1", Lease: time.Second}, {VM: "web", Generation: 1, Holder: "h", Lease: time.Minute}}))
	f.Add([]byte(`{"format":"govmm-witness-state","version":1,"vms":[{"vm":"a","generation":1,"holder":"h","lease_ms":5}]}`))
	f.Add([]byte(`{"format":"govmm-witness-state","version":1,"vms":null} {}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		recs, err := decodeState(b)
		if err != nil {
			return
		}
		again, err := decodeState(encodeState(recs))
		require.NoError(t, err)
		if len(recs) == 0 {
			require.Empty(t, again)
			return
		}
		require.Equal(t, recs, again)
	})
}
