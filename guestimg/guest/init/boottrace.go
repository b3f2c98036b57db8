package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"govmm/guestimg/internal/guestproto"
)

// kmsgMarks are the kernel log messages whose times the boot trace
// reports, by the key it reports them under. A kernel with the RAM disk
// driver (IS_ENABLED(CONFIG_BLK_DEV_RAM): Debian's has it as a module)
// says "Trying to unpack rootfs image as initramfs...", one without it
// "Unpacking initramfs..." (init/initramfs.c).
var kmsgMarks = []struct{ key, prefix string }{
	{"unpack", "Unpacking initramfs"},
	{"unpack", "Trying to unpack rootfs image as initramfs"},
	{"unpacked", "Freeing initrd memory"},
	{"run-init", "Run /init as init process"},
}

// traceMark is what /init writes to the kernel log to learn the kernel's
// clock now (KERN_DEBUG: no console shows it at the default level).
const traceMark = "govmm-init: boot trace"

// bootTraceLine reads the kernel log and returns the line that tells the
// VMM where boot time went: guestproto.BootTraceLine followed by
// key=microseconds of the kernel's printk clock, for each mark found and
// for "now" (the clock as /init prints the line; the ready line follows at
// once). printk's clock is what the console's [ seconds ] stamps show.
func bootTraceLine() (string, error) {
	// The log is read first and the mark written after it: reading some
	// hundred records one by one takes a while in an emulated guest
	// (~0.2 s in the lab), and "now" must be the clock as the line goes
	// out, or the VMM places the clock's zero that much late.
	w, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0)
	if err != nil {
		return "", err
	}
	defer w.Close()
	fd, err := syscall.Open("/dev/kmsg", syscall.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer syscall.Close(fd)
	buf := make([]byte, 8192) // one record per read; longer ones fail with EINVAL
	records := readKmsg(fd, buf, nil)
	if _, err := fmt.Fprintf(w, "<7>%s\n", traceMark); err != nil {
		return "", err
	}
	return formatBootTrace(readKmsg(fd, buf, records)), nil
}

// readKmsg appends to records what fd, an open /dev/kmsg, has left to read.
func readKmsg(fd int, buf []byte, records []string) []string {
	for {
		n, err := syscall.Read(fd, buf)
		if errors.Is(err, syscall.EPIPE) {
			continue // records were overwritten before we read them
		}
		if err != nil || n <= 0 {
			return records // EAGAIN: the end of the log
		}
		records = append(records, string(buf[:n]))
	}
}

// formatBootTrace builds the boot trace line from /dev/kmsg records
// ("prio,seq,usec,flags;message\n", Documentation/ABI/testing/dev-kmsg).
// The first record of each mark counts; "now" is the last traceMark.
func formatBootTrace(records []string) string {
	found := map[string]int64{}
	var order []string
	for _, r := range records {
		hdr, msg, ok := strings.Cut(r, ";")
		if !ok {
			continue
		}
		f := strings.Split(hdr, ",")
		if len(f) < 3 {
			continue
		}
		usec, err := strconv.ParseInt(f[2], 10, 64)
		if err != nil {
			continue
		}
		msg = strings.TrimRight(msg, "\n")
		if msg == traceMark {
			if _, seen := found["now"]; !seen {
				order = append(order, "now")
			}
			found["now"] = usec
			continue
		}
		for _, m := range kmsgMarks {
			if _, seen := found[m.key]; !seen && strings.HasPrefix(msg, m.prefix) {
				found[m.key] = usec
				order = append(order, m.key)
			}
		}
	}
	var b strings.Builder
	b.WriteString(guestproto.BootTraceLine)
	for _, k := range order {
		fmt.Fprintf(&b, " %s=%d", k, found[k])
	}
	return b.String()
}
