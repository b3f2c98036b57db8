package bench

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"govmm/lab"
)

// Machine describes where a run happened, for the report.
func Machine() string {
	var b strings.Builder
	cpu := "unknown"
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		cpu = cpuName(string(data))
	}
	kernel, _ := exec.Command("uname", "-r").Output()
	fmt.Fprintf(&b, "- CPU: %s, %d cores\n", cpu, runtime.NumCPU())
	fmt.Fprintf(&b, "- host kernel: %s\n", strings.TrimSpace(string(kernel)))
	fmt.Fprintf(&b, "- Go: %s\n", runtime.Version())
	if cc, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control"); err == nil {
		// Every stream number over TCP depends on it: on this project's
		// host (bbr, which paces) the stream acked 4,096 pages ~20% later
		// than in cubic's faster runs (docs/STREAM.md, "Congestion
		// control").
		fmt.Fprintf(&b, "- TCP congestion control: %s (the kernel's default, which the stream and the bounds use)\n", strings.TrimSpace(string(cc)))
	}
	if lab.InLab() {
		b.WriteString("- KVM: the lab's L1, kvm_amd on QEMU's emulated SVM (nested, all in software): lab numbers, for ratios only\n")
	} else if r := lab.Emulated(); r != "" {
		fmt.Fprintf(&b, "- KVM: %s\n", r)
	} else {
		b.WriteString("- KVM: hardware-assisted\n")
	}
	if out, err := exec.Command("qemu-system-x86_64", "--version").Output(); err == nil {
		fmt.Fprintf(&b, "- peer: %s\n", strings.SplitN(string(out), "\n", 2)[0])
	}
	return b.String()
}

// cpuName is the first CPU's model name from /proc/cpuinfo's text, with
// its vendor and family: the family decides some of a Linux guest's work
// (the lab's L1 is QEMU's "max" model under the family `govmm lab --cpu-model`
// gives it).
func cpuName(cpuinfo string) string {
	fields := map[string]string{}
	for _, l := range strings.Split(cpuinfo, "\n") {
		if l == "" && len(fields) > 0 {
			break // the first CPU's block ends
		}
		if k, v, ok := strings.Cut(l, ":"); ok {
			fields[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	name := fields["model name"]
	if name == "" {
		return "unknown"
	}
	if v, f := fields["vendor_id"], fields["cpu family"]; v != "" && f != "" {
		name += fmt.Sprintf(" (%s, family %s)", v, f)
	}
	return name
}

// WriteReport writes report.md into dir: the command that reproduces the
// run, the machine, then each section.
func WriteReport(dir, command string, sections map[string]string, order []string) error {
	var b bytes.Buffer
	fmt.Fprintf(&b, "# govmm benchmark report\n\n%s\n\nReproduce with:\n\n    %s\n\n## Machine\n\n%s\n",
		time.Now().UTC().Format(time.RFC3339), command, Machine())
	for _, name := range order {
		if sections[name] == "" {
			fmt.Fprintf(&b, "## %s\n\nNot finished: see the command's error.\n\n", name)
			continue
		}
		fmt.Fprintf(&b, "## %s\n\n%s\n", name, sections[name])
	}
	if entries, err := os.ReadDir(dir); err == nil {
		b.WriteString("## Files\n\nEvery plot is there twice: a PNG and, beside it, the same plot as an SVG.\n\n")
		for _, e := range entries {
			if n := e.Name(); n != "report.md" && !e.IsDir() {
				fmt.Fprintf(&b, "- `%s`\n", n)
			}
		}
	}
	return os.WriteFile(filepath.Join(dir, "report.md"), b.Bytes(), 0o644)
}
