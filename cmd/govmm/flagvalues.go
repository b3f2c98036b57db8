package main

// The flag values that check themselves as they are set (durations,
// CPUs, pages, memory sizes, choices, compression, host:port), so that a
// bad one is refused, naming its flag, before anything starts.

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"govmm/replicate"
	"govmm/replicate/stream"
	"govmm/replicate/witness"
	"govmm/vmm"
)

// durationFlag is a duration flag whose value is checked as it is set,
// so that a bad one is refused, naming the flag, before anything starts.
type durationFlag struct {
	d     *time.Duration
	check func(time.Duration) error
}

func (f durationFlag) String() string {
	if f.d == nil {
		return ""
	}
	return f.d.String()
}

func (f durationFlag) Set(s string) error {
	d, err := parseDuration(s)
	if err != nil {
		return err
	}
	if err := f.check(d); err != nil {
		return err
	}
	*f.d = d
	return nil
}

func (f durationFlag) typeName() string { return "duration" }

// parseDuration is time.ParseDuration with an error that says what is
// wanted (not the value again: the caller names it).
func parseDuration(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, errors.New("not a duration (e.g. 25ms, 2s)")
	}
	return d, nil
}

// durationVar registers a checked duration flag on fs.
func durationVar(fs *flag.FlagSet, d *time.Duration, name string, value time.Duration, check func(time.Duration) error, usage string) {
	*d = value
	fs.Var(durationFlag{d: d, check: check}, name, usage)
}

// parseEpoch reads an epoch as every interface takes it: the --epoch of
// run and standby, and the control API's replicate request.
func parseEpoch(s string) (time.Duration, error) {
	d, err := parseDuration(s)
	if err != nil {
		return 0, err
	}
	return d, replicate.CheckEpoch(d)
}

// parseMaxEpoch reads an --epoch-max as every interface takes it (run,
// standby, the control API's replicate request): 0, or an epoch.
func parseMaxEpoch(s string) (time.Duration, error) {
	d, err := parseDuration(s)
	if err != nil {
		return 0, err
	}
	return d, replicate.CheckMaxEpoch(d)
}

// cpusFlag is --cpus: 1..vmm.MaxCPUs.
type cpusFlag struct{ n *int }

func (f cpusFlag) String() string {
	if f.n == nil {
		return ""
	}
	return strconv.Itoa(*f.n)
}

func (f cpusFlag) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > vmm.MaxCPUs {
		return fmt.Errorf("want a number of vCPUs from 1 to %d", vmm.MaxCPUs)
	}
	*f.n = n
	return nil
}

func (f cpusFlag) typeName() string { return "N" }

// pagesFlag is a number of pages, checked as it is set.
type pagesFlag struct {
	n     *int
	check func(int) error
}

func (f pagesFlag) String() string {
	if f.n == nil {
		return ""
	}
	return strconv.Itoa(*f.n)
}

func (f pagesFlag) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil {
		return errors.New("want a number of pages")
	}
	if err := f.check(n); err != nil {
		return err
	}
	*f.n = n
	return nil
}

func (f pagesFlag) typeName() string { return "PAGES" }

// memFlag is a guest memory size: a number with a K, M, G or T suffix,
// and a bare number in MiB, as QEMU's -m takes it.
type memFlag struct{ s *string }

func (f memFlag) String() string {
	if f.s == nil {
		return ""
	}
	return *f.s
}

func (f memFlag) Set(s string) error {
	size, err := parseMemSize(s)
	if err != nil {
		return err
	}
	if size < vmm.MinMemory {
		return fmt.Errorf("%s is below the minimum of %s", ctlBytes(size), ctlBytes(vmm.MinMemory))
	}
	if size%(2<<20) != 0 {
		return fmt.Errorf("%s is not a multiple of 2 MiB", ctlBytes(size))
	}
	*f.s = s
	return nil
}

func (f memFlag) typeName() string { return "SIZE" }

// parseMemSize reads a memory size: 256M, 1G, 4096K, 1T, with an optional
// B or iB; a bare number is MiB, as for QEMU's -m.
func parseMemSize(s string) (uint64, error) {
	mult := uint64(1 << 20)
	t := strings.TrimSuffix(strings.ToUpper(s), "B")
	t = strings.TrimSuffix(t, "I")
	switch {
	case strings.HasSuffix(t, "K"):
		mult, t = 1<<10, t[:len(t)-1]
	case strings.HasSuffix(t, "M"):
		mult, t = 1<<20, t[:len(t)-1]
	case strings.HasSuffix(t, "G"):
		mult, t = 1<<30, t[:len(t)-1]
	case strings.HasSuffix(t, "T"):
		mult, t = 1<<40, t[:len(t)-1]
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil || n == 0 {
		return 0, errors.New("not a size (e.g. 256M or 2G; a bare number is MiB)")
	}
	if n > (1<<63)/mult {
		return 0, errors.New("too large")
	}
	return n * mult, nil
}

// choiceFlag is a string flag that takes one of a few words.
type choiceFlag struct {
	s       *string
	choices []string
}

func (f choiceFlag) String() string {
	if f.s == nil {
		return ""
	}
	return *f.s
}

func (f choiceFlag) Set(s string) error {
	for _, c := range f.choices {
		if s == c {
			*f.s = s
			return nil
		}
	}
	return fmt.Errorf("want %s", strings.Join(f.choices, " or "))
}

func (f choiceFlag) typeName() string { return strings.Join(f.choices, "|") }

// compressFlag is --stream-compress.
type compressFlag struct{ c *stream.Compression }

func (f compressFlag) String() string {
	if f.c == nil || *f.c == stream.CompressDefault {
		return ""
	}
	return f.c.String()
}

func (f compressFlag) Set(s string) error {
	c, err := stream.ParseCompression(s)
	if err != nil {
		return errors.New("want none, s2 or zstd")
	}
	*f.c = c
	return nil
}

func (f compressFlag) typeName() string { return "none|s2|zstd" }

// cipherFlag is --stream-cipher.
type cipherFlag struct{ c *stream.Cipher }

func (f cipherFlag) String() string {
	if f.c == nil {
		return ""
	}
	return f.c.String()
}

func (f cipherFlag) Set(s string) error {
	c, err := stream.ParseCipher(s)
	if err != nil {
		return errors.New("want auto, aegis-128x2, aegis-128l or aes-256-gcm")
	}
	*f.c = c
	return nil
}

func (f cipherFlag) typeName() string { return "auto|aegis-128x2|aegis-128l|aes-256-gcm" }

// sendBufferFlag is --stream-send-buffer.
type sendBufferFlag struct{ n *int }

func (f sendBufferFlag) String() string {
	switch {
	case f.n == nil || *f.n == stream.SendBufferAuto:
		return "auto"
	case *f.n == stream.SendBufferKernel:
		return "kernel"
	case *f.n%(1<<20) == 0:
		return fmt.Sprintf("%dM", *f.n>>20)
	case *f.n%(1<<10) == 0:
		return fmt.Sprintf("%dK", *f.n>>10)
	}
	return strconv.Itoa(*f.n)
}

func (f sendBufferFlag) Set(s string) error {
	n, err := stream.ParseSendBuffer(s)
	if err != nil {
		return fmt.Errorf("want auto, kernel, or a size from 1 byte to %dM (256K, 1M)", stream.MaxSendBuffer>>20)
	}
	*f.n = n
	return nil
}

func (f sendBufferFlag) typeName() string { return "auto|kernel|SIZE" }

// hostPortFlag is a string flag that takes HOST:PORT.
type hostPortFlag struct{ s *string }

func (f hostPortFlag) String() string {
	if f.s == nil {
		return ""
	}
	return *f.s
}

func (f hostPortFlag) Set(s string) error {
	if err := checkHostPort(s); err != nil {
		return err
	}
	*f.s = s
	return nil
}

func (f hostPortFlag) typeName() string { return "HOST:PORT" }

// checkHostPort says why s is not HOST:PORT with a numeric port.
func checkHostPort(s string) error {
	_, port, err := net.SplitHostPort(s)
	if err != nil {
		return errors.New("want HOST:PORT")
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return errors.New("want HOST:PORT with a port from 0 to 65535")
	}
	return nil
}

// leaseCheck is witness.CheckLease for a flag.
func leaseCheck(d time.Duration) error { return witness.CheckLease(d) }
